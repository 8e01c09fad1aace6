"""natvision-label: photos labelled by their nearest reference photos.

    natvision-label --output_dir RUN --reference REFRUN --model EMBEDDER \\
        --taxa TAXA [--taxon_column taxon_id] [--k 10] \\
        [--rollup_threshold 0.8] [--out RUN/labels/<model>.parquet]

Every photo of RUN's ``embeddings/<model>/`` table is searched in REFRUN's
table of the same model (e.g. research-grade iNaturalist photos ingested
by natvision-ingest, whose rows carry the observation's ``taxon_id``), and
its k nearest reference photos vote (tools/label_vote.py: weights are the
cosine similarities clipped at 0, normalised to sum 1, rolled up with
transforms/taxonomy.py's rule).  The search uses the reference's FAISS index
(tools/index.py, built by natvision-index; without one an exact index is
built in memory, with a warning).

The query table is read one record batch at a time and the answers are
written as they come (``pyarrow.parquet.ParquetWriter``), so the heap holds
one batch, the index's quantizer and 4 bytes per reference row (its taxon's
column); the index's vectors and the reference's image ids are
memory-mapped files (tools/index.py ``_read_index``, ``_mapped_ids``).  The table is written under a temporary name and renamed
when complete.  Every photo of the query table has exactly one row.

Exit status: 0 written; 2 a flag or table that cannot be used (the message
names the flag); 1 a storage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from natvision import transforms
from natvision.transforms import console
from natvision.transforms import extras
from natvision.transforms import helptext
from natvision.transforms import models as models_lib
from natvision.transforms import storage
from natvision.transforms import taxonomy
from natvision.tools import index as index_lib
from natvision.tools import label_vote
from natvision.tools import tables as tables_lib

LABELS_DIR = "labels"
METADATA_KEY = b"natvision_label"
BATCH_ROWS = 4096


class LabelError(ValueError):
  """A flag or table natvision-label cannot use; the message names it."""


def default_out(output_dir: str, model: str) -> str:
  """``RUN/labels/<model>.parquet``."""
  return FileSystems.join(output_dir, LABELS_DIR, f"{model}.parquet")


def _taxon_ids(column: pa.ChunkedArray, flag_value: str):
  """(int64 ids ``[N]``, mask of rows with one) from an int or text column.

  Raises:
    LabelError: text that is not a whole number.
  """
  if pa.types.is_integer(column.type):
    ints = column
  else:
    try:
      ints = pc.cast(pc.utf8_trim_whitespace(column.cast(pa.string())),
                     pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
      raise LabelError(f"--taxon_column {flag_value}: the reference's values "
                       f"are not all taxon ids (whole numbers): {e}") from e
  ints = ints.combine_chunks() if isinstance(ints, pa.ChunkedArray) else ints
  has = ints.is_valid().to_numpy(zero_copy_only=False)
  return ints.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), has


def open_reference(reference: str, model: str, taxon_column: str,
                   taxa: taxonomy.Taxa, threshold: float):
  """The reference's searcher and its rows' taxa, in index order.

  The reference is read one file at a time.  Its image ids go to a local
  temporary Arrow file that is memory-mapped and unlinked (``_mapped_ids``),
  so that, like the index's vectors, they cost page cache, not heap; the
  heap holds 4 bytes per reference row (its taxon's column).

  Returns:
    (searcher, ``label_vote.Reference``, rows without a taxon id).

  Raises:
    LabelError: no such table, not an embedder, no taxon column, a stale
      index.
  """
  try:
    searcher = index_lib.open_searcher(reference, model)
  except (tables_lib.TableError, index_lib.SearchError) as e:
    raise LabelError(f"--reference {reference}: {e}") from e
  names = searcher.table.schema().names
  if taxon_column not in names:
    carried = ", ".join(tables_lib.carried_columns(searcher.table.schema()))
    raise LabelError(
        f"--taxon_column {taxon_column}: the reference's {model} table has "
        f"no such column (it carries: {carried or 'none'}); label from a run "
        f"whose rows carry taxon ids, e.g. natvision-ingest of iNaturalist "
        f"observations, or name the column with --taxon_column")
  n = searcher.index.ntotal
  ids = np.zeros(n, np.int64)
  has = np.zeros(n, bool)
  done = 0

  def parts():
    nonlocal done
    for table_file in searcher.table.files:
      data = tables_lib.read_files([table_file], ["image_id", taxon_column])
      m = data.num_rows
      if done + m > n:
        break
      if taxon_column in data.column_names:
        ids[done:done + m], has[done:done + m] = _taxon_ids(
            data.column(taxon_column), taxon_column)
      done += m
      yield data.column("image_id")
  image_ids = _mapped_ids(parts())
  if done != n or len(image_ids) != n:
    raise LabelError(
        f"--reference {reference}: the {model} table's rows do not match its "
        f"index's {n}; rebuild it: natvision-index --output_dir {reference} "
        f"--model {model}")
  if not has.any():
    raise LabelError(f"--taxon_column {taxon_column}: every row of the "
                     f"reference's {model} table is null there")
  ref = label_vote.Reference.from_columns(image_ids, ids, has, taxa,
                                          threshold)
  return searcher, ref, int((~has).sum())


def _mapped_ids(columns) -> pa.ChunkedArray:
  """The image id columns, written to a local temporary Arrow IPC file,
  memory-mapped (zero copy) and unlinked; the mapping outlives the name."""
  import tempfile  # pylint: disable=import-outside-toplevel
  fd, path = tempfile.mkstemp(suffix=".arrow", prefix="natvision-label-ids-")
  os.close(fd)
  try:
    schema = pa.schema([("image_id", pa.string())])
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as out:
      for column in columns:
        out.write_table(pa.table({"image_id": column.cast(pa.string())}))
    return pa.ipc.open_file(pa.memory_map(path)).read_all().column(
        "image_id")
  finally:
    os.unlink(path)


def _query_table(output_dir: str, model: str) -> tables_lib.ModelTable:
  try:
    table = tables_lib.open_model_table(output_dir, model)
  except tables_lib.TableError as e:
    raise LabelError(f"--model {model} / --output_dir: {e}") from e
  if table.kind != models_lib.EMBEDDER:
    raise LabelError(f"--model {model} is a {table.kind}; labelling needs an "
                     f"embedder's table (OUT/embeddings/<model>/)")
  return table


def label_run(output_dir: str, reference: str, model: str, taxa_path: str,
              taxon_column: str = "taxon_id", k: int = 10,
              threshold: float = taxonomy.DEFAULT_ROLLUP_THRESHOLD,
              out: Optional[str] = None, batch_rows: int = BATCH_ROWS) -> dict:
  """Labels every photo of one run's embeddings table; writes the table.

  Args:
    output_dir: the run whose photos are labelled.
    reference: the run whose rows carry ``taxon_column``.
    model: the embedder both runs' tables are of.
    taxa_path: the taxonomy (transforms/taxonomy.py ``read_taxa``).
    k: neighbours per photo.
    threshold: the roll-up threshold, in (0, 1].
    out: the Parquet file to write (default ``default_out``).
    batch_rows: query rows per batch.

  Returns:
    A summary: photos, answered, by_rank, reference rows (and those without
    a taxon), index kind, seconds; also stored in the file's metadata.

  Raises:
    LabelError: flags or tables that cannot be used.
    storage.StorageError: reading or writing failed.
  """
  start = time.perf_counter()
  if k < 1:
    raise LabelError(f"--k must be at least 1, not {k}")
  if not 0.0 < threshold <= 1.0:
    raise LabelError(f"--rollup_threshold must be in (0, 1], not {threshold}")
  try:
    taxa = taxonomy.read_taxa(taxa_path)
  except taxonomy.TaxonomyError as e:
    raise LabelError(str(e)) from e
  query = _query_table(output_dir, model)
  searcher, ref, untaxed = open_reference(reference, model, taxon_column,
                                          taxa, threshold)
  width = query.schema().field("embedding").type.list_size
  if width != searcher.index.d:
    raise LabelError(
        f"--model {model}: the query table's embeddings have {width} "
        f"dimensions, the reference's {searcher.index.d}; both runs must "
        f"use the same model")
  # A run labelled from itself: each photo's own row is left out.
  same = query.root.rstrip("/") == searcher.table.root.rstrip("/")
  vote = label_vote.Vote(ref)
  out = out or default_out(output_dir, model)
  meta = {"model": model, "output_dir": output_dir, "reference": reference,
          "taxon_column": taxon_column, "taxa": taxa_path,
          "taxa_fingerprint": ref.label_taxa.fingerprint, "k": k,
          "rollup_threshold": threshold, "leave_one_out": same,
          "index": {key: searcher.meta.get(key) for key in
                    ("kind", "factory", "nprobe", "recall_at_10")},
          "reference_rows": int(searcher.index.ntotal),
          "reference_rows_without_taxon": untaxed,
          "version": transforms.__version__}
  schema = label_vote.SCHEMA.with_metadata(
      {METADATA_KEY: json.dumps(meta).encode()})
  folder = os.path.dirname(out.rstrip("/")) if "://" not in out else None
  if folder and not os.path.isdir(folder):
    os.makedirs(folder, exist_ok=True)
  partial = out + ".partial"
  photos = answered = 0
  by_rank: dict = {}
  try:
    photos, answered = _write(partial, schema, query, searcher, vote, k,
                              same, batch_rows, by_rank)
  except BaseException:
    if storage.exists(partial):  # a half-written table is no table
      FileSystems.delete([partial])
    raise
  if storage.exists(out):
    FileSystems.delete([out])
  FileSystems.rename([partial], [out])
  return dict(meta, out=out, photos=photos, answered=answered,
              by_rank=dict(sorted(by_rank.items(), key=lambda kv: -kv[1])),
              seconds=round(time.perf_counter() - start, 3))


def _write(partial: str, schema: pa.Schema, query: tables_lib.ModelTable,
           searcher: index_lib.Searcher, vote: label_vote.Vote, k: int,
           same: bool, batch_rows: int, by_rank: dict) -> tuple:
  """Labels the query table batch by batch into ``partial``; counts the
  answers per rank into ``by_rank``; returns (photos, answered)."""
  photos = answered = 0
  with storage.failing_as("writing", partial):
    sink = FileSystems.create(partial)
  with sink, pq.ParquetWriter(sink, schema) as writer:
    for table_file in query.files:
      with storage.failing_as("reading", table_file.path):
        f = FileSystems.open(table_file.path)
      with f:
        with storage.failing_as("reading", table_file.path):
          batches = pq.ParquetFile(f).iter_batches(
              batch_size=batch_rows, columns=["image_id", "uri", "embedding"])
        while True:
          with storage.failing_as("reading", table_file.path):
            batch = next(batches, None)
          if batch is None:
            break
          labelled = _label_batch(batch, searcher, vote, k, same)
          with storage.failing_as("writing", partial):
            writer.write_batch(labelled)
          photos += labelled.num_rows
          ranks = labelled.column("rank").drop_null()
          answered += len(ranks)
          for item in pc.value_counts(ranks).to_pylist():
            key = item["values"] or "(no rank)"
            by_rank[key] = by_rank.get(key, 0) + item["counts"]
  return photos, answered


def _label_batch(batch: pa.RecordBatch, searcher: index_lib.Searcher,
                 vote: label_vote.Vote, k: int, same: bool
                 ) -> pa.RecordBatch:
  image_ids = batch.column("image_id").to_pylist()
  column = batch.column("embedding")
  vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(
      len(column), column.type.list_size)
  if not len(vectors):
    return vote(image_ids, [], np.zeros((0, k)), np.zeros((0, k), np.int64))
  scores, rows = searcher.search(vectors, k + 1 if same else k)
  if same:
    own = pc.equal(vote.reference.image_ids.take(
        pa.array(np.maximum(rows, 0).reshape(-1))).combine_chunks(),
        pa.array(np.repeat(image_ids, rows.shape[1]), pa.string()))
    own = own.fill_null(False).to_numpy(zero_copy_only=False).reshape(
        rows.shape) & (rows >= 0)
    # Drop the photo's own row where it was found, else the last one.
    keep = np.argsort(own, axis=1, kind="stable")[:, :rows.shape[1] - 1]
    scores = np.take_along_axis(scores, keep, axis=1)
    rows = np.take_along_axis(rows, keep, axis=1)
  return vote(image_ids, batch.column("uri").to_pylist(), scores, rows)


def parser() -> argparse.ArgumentParser:
  """natvision-label's flags."""
  p = helptext.ArgumentParser(
      prog="natvision-label",
      formatter_class=helptext.HelpFormatter,
      description="Label the photos of one run by their k nearest photos in "
      "another run's embeddings table whose rows carry taxon ids (e.g. "
      "research-grade iNaturalist observations ingested by "
      "natvision-ingest). The neighbours vote, weighted by cosine "
      "similarity, and the vote rolls up to the deepest taxon whose share "
      "reaches --rollup_threshold. Writes a Parquet table: image_id, uri, "
      "taxon_id, name, rank, score, neighbours, top_neighbour_id.",
      epilog=helptext.epilog([
          "natvision-label --output_dir out --reference ref "
          "--model inaturalist_v2 --taxa taxa.csv.gz",
          "natvision-label --output_dir out --reference ref "
          "--model inaturalist_v2 --taxa Taxon.tsv --k 20 "
          "--rollup_threshold 0.9"]))
  p.add_argument("--output_dir", required=True,
                 help="the run whose photos are labelled (its "
                 "embeddings/<model>/ table; local or gs://)")
  p.add_argument("--reference", required=True,
                 help="the run whose rows carry taxon ids; its index "
                 "(natvision-index) is used when there is one")
  p.add_argument("--model", required=True,
                 help="the embedder whose tables both runs hold")
  p.add_argument("--taxa", required=True, metavar="PATH",
                 help="an iNaturalist taxa table or a GBIF backbone Taxon.tsv "
                 "(docs/taxonomy.md)")
  p.add_argument("--taxon_column", default="taxon_id",
                 help="the reference's column of taxon ids")
  p.add_argument("--k", type=int, default=10, help="neighbours per photo")
  p.add_argument("--rollup_threshold", type=float,
                 default=taxonomy.DEFAULT_ROLLUP_THRESHOLD,
                 help="a photo is answered at the deepest taxon whose "
                 "neighbours' share of the weight reaches this")
  p.add_argument("--out", metavar="PATH",
                 help="the Parquet file to write (default: "
                 "OUTPUT_DIR/labels/<model>.parquet)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """natvision-label: writes the label table and prints a summary."""
  console.configure_logging()
  p = parser()
  args = p.parse_args(argv)
  if args.k < 1:
    p.error(f"--k must be at least 1, not {args.k}")
  if not 0.0 < args.rollup_threshold <= 1.0:
    p.error(f"--rollup_threshold must be in (0, 1], not "
            f"{args.rollup_threshold}")
  status = extras.check_command("tools", "natvision-label")
  if status is not None:
    return status
  try:
    summary = label_run(args.output_dir, args.reference, args.model,
                        args.taxa, args.taxon_column, args.k,
                        args.rollup_threshold, args.out)
  except LabelError as e:
    print(f"natvision-label: error: {e}", file=sys.stderr)
    return 2
  except storage.StorageError as e:
    print(f"natvision-label: storage error: {e}", file=sys.stderr)
    return 1
  ranks = ", ".join(f"{r} {c}" for r, c in summary["by_rank"].items())
  print(f"{args.model}: {summary['photos']} photos labelled from "
        f"{summary['reference_rows']} reference rows "
        f"({summary['index']['kind']} index), {summary['answered']} answered"
        f"{' (' + ranks + ')' if ranks else ''}; wrote {summary['out']} in "
        f"{summary['seconds']:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
