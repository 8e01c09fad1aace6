"""Snapshots: find the photos of an iNaturalist open-data snapshot still to do.

iNaturalist publishes its open data as periodic snapshots of three tables
(``photos``, ``observations``, ``taxa``), tab-separated and unquoted,
optionally gzipped, or here also as Parquet with the same columns.  The
scheduled job (``pipelines.ingest_observations``) turns each snapshot into
the ``ImageRef`` values that still need work, entirely inside the pipeline.
The parts, in the order data flows through them:

* ``tables``: at launch, finds each table (a file or a folder of parts) and
  checks its columns from the header or Parquet footer only
  (``open_snapshot``, ``find_table``, ``read_columns``).
* ``template``: ``--photo_uri_template``, checked against the columns and
  split by table (``UriTemplate``, ``template_sources``).
* ``rows``: a table row as a typed ``PhotoRow``, ``ObservationRow`` or
  ``TaxonRow``; ``BadRow`` for one that cannot be used.
* ``filters``: which observations a run keeps (quality grade, taxonomy
  subtrees, licences) and which models each is routed to (``--route``):
  ``Filters``, ``SnapshotConfig``, ``subtree_pairs``.
* ``read``: ``ReadSnapshot`` reads the tables inside the pipeline (only the
  columns it needs), filters and routes the observations, and joins photos
  to observations with a CoGroupByKey on ``observation_uuid``.
* ``history``: what earlier partitions of the output hold, listed at launch
  (``find_history``) and read inside the pipeline (``ReadHistory``: ids
  only).
* ``plan``: ``SelectWork`` joins the two on ``image_id`` and decides, per
  photo, which models still have to see it (``plan_photo``); ``NewPhotos``
  is the whole reader.
* ``stats``: counts kept as Beam counters and emitted as (name, count) data
  (``STATS``, ``SumStats``), so that the pipeline writes its own summary.

A photo's ``image_id`` is its ``photo_id`` as text: the key of the photo
store's paths, short, and stable across snapshots.  A photo attached to
several observations is processed once, with the observation whose uuid
sorts first among those that pass the filters.

Every public name of the parts is importable from here
(``from transforms import snapshots; snapshots.open_snapshot(...)``).
"""

from natvision.transforms.snapshots.stats import (COUNTER_PREFIX, METRICS_NAMESPACE,
                                        STATS, SumStats)
from natvision.transforms.snapshots.tables import (OBSERVATIONS, PARQUET, PHOTOS,
                                         REQUIRED_COLUMNS, SUFFIXES, TABLES,
                                         TAXA, TSV, Snapshot, SnapshotError,
                                         TableFiles, find_table, match_paths,
                                         open_snapshot, read_columns)
from natvision.transforms.snapshots.template import (TemplateSources, UriTemplate,
                                           template_sources)
from natvision.transforms.snapshots.rows import (BadRow, ObservationRow, PhotoRow,
                                       TaxonRow, observation_from_row,
                                       photo_from_row, taxon_from_row)
from natvision.transforms.snapshots.filters import (QUALITY_GRADES, Filters,
                                          RoutedObservation, SnapshotConfig,
                                          Subtrees, in_subtrees, subtree_pairs)
from natvision.transforms.snapshots.read import (CARRIED, LenientUtf8Coder,
                                       ReadSnapshot, ReadTableRows, image_ref,
                                       observation_order)
from natvision.transforms.snapshots.history import (PARTITION_KEY, History, ReadHistory,
                                          find_history, partition_files,
                                          partition_name, unpartitioned_files)
from natvision.transforms.snapshots.plan import (NewPhotos, PhotoPlan, SelectWork,
                                       plan_photo)

__all__ = [
    # tables
    "PHOTOS", "OBSERVATIONS", "TAXA", "TABLES", "TSV", "PARQUET",
    "SUFFIXES", "REQUIRED_COLUMNS", "SnapshotError", "TableFiles",
    "Snapshot", "match_paths", "read_columns", "find_table", "open_snapshot",
    # template
    "UriTemplate", "TemplateSources", "template_sources",
    # rows
    "BadRow", "PhotoRow", "ObservationRow", "TaxonRow", "photo_from_row",
    "observation_from_row", "taxon_from_row",
    # filters
    "QUALITY_GRADES", "Filters", "Subtrees", "in_subtrees", "subtree_pairs",
    "SnapshotConfig", "RoutedObservation",
    # read
    "CARRIED", "LenientUtf8Coder", "ReadTableRows", "image_ref",
    "observation_order", "ReadSnapshot",
    # history
    "PARTITION_KEY", "partition_name", "History", "partition_files",
    "unpartitioned_files", "find_history", "ReadHistory",
    # plan
    "PhotoPlan", "plan_photo", "SelectWork", "NewPhotos",
    # stats
    "METRICS_NAMESPACE", "COUNTER_PREFIX", "STATS", "SumStats",
]
