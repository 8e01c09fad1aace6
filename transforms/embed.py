"""The middle of every job: photos in, one staged table per model out.

``EmbedAndWrite`` takes ``ImageRef`` values from any reader (globs,
manifests, Darwin Core archives, snapshots) and:

1. leaves out the photos a dead attempt already finished and copies their
   rows instead (``resume.LeaveOutReused``: a join with the dead attempts'
   shards, in the graph);
2. reads, decodes and prepares each photo once (``photos_keyed.ReadAndPrepare``);
3. runs each model on the photos routed to it, in batches
   (``inference.RunModel``), on the runtime the launcher decided;
4. writes one table per model and the errors table as closed shards in the
   run's staging folder (``sinks.WriteTable``).

Steps 3 and 4 are applied to each of ``ReadAndPrepare``'s branches (local
and cloud files; http(s) photos keyed by host) apart, and only the shard
paths, error rows and load counts are flattened: the prepared photos never
pass through a Flatten or a shuffle, so every runner fuses each photo's
read, model and write into one stage and no stage holds the run's photos
(see ``photos_keyed.PhotoOutputs``).  Each model's two branches share one
``shared.Shared`` handle, so a process loads it once.

Its outputs feed the commit (transforms/commit.py) and the run summary:
the shard paths, the errors as Arrow tables (counted in the graph, see
transforms/summary.py) and the model loads per worker process.

``EmbedConfig`` holds every setting of these steps.  Each part owns its
flags: the models (transforms/models.py), reading and decoding
(``photos.PhotoConfig``, with ``fetch.FetchConfig``), batching
(transforms/inference.py) and the shard size (here).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.utils import shared

from natvision.transforms import commit
from natvision.transforms import config
from natvision.transforms import inference
from natvision.transforms import models as models_lib
from natvision.transforms import photos
from natvision.transforms import photos_keyed
from natvision.transforms import prior as prior_lib
from natvision.transforms import resume as resume_lib
from natvision.transforms import sinks
from natvision.transforms import taxonomy as taxonomy_lib
from natvision.transforms.runtimes import quantize

# Keys of the dict of PCollections EmbedAndWrite returns.
WRITTEN = "written"
ERROR_TABLES = "error_tables"
LOADS = "loads"
TALLIES = "tallies"


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  """The models and how photos reach them, parsed and checked once.

  Attributes:
    models: the resolved models; the launcher attaches each one's runtime
      decision (``with_models``) before the graph is built.
    photos: reading, decoding and preparation.
    batch_size: photos per forward pass.
    top_k: labels kept per photo by classifiers.
    shard_rows: rows after which a table shard is closed.
    quantization: ``--precision`` (int8 is decided by the launcher, see
      transforms/runtimes/quantize.py).
    taxonomy: ``--taxa`` and the roll-up flags (the launcher attaches each
      classifier's labels' taxa, see transforms/taxonomy.py).
    prior: ``--prior`` and its flags (the launcher attaches the prior's
      settings to each classifier, see transforms/prior.py).
  """

  models: Tuple[models_lib.ResolvedModel, ...]
  photos: photos.PhotoConfig
  batch_size: int = inference.DEFAULT_BATCH_SIZE
  top_k: int = inference.DEFAULT_TOP_K
  shard_rows: int = sinks.DEFAULT_SHARD_ROWS
  quantization: quantize.QuantizationConfig = quantize.QuantizationConfig()
  taxonomy: taxonomy_lib.TaxonomyConfig = taxonomy_lib.TaxonomyConfig()
  prior: prior_lib.PriorConfig = prior_lib.PriorConfig()

  def __post_init__(self):
    if not self.models:
      raise config.ConfigError("--models names no model")
    if self.shard_rows < 1:
      raise config.ConfigError("--shard_rows must be at least 1")
    if self.quantization.int8 and any(
        m.requested_runtime == "tf" for m in self.models):
      raise config.ConfigError(
          "--precision int8 runs on ONNX Runtime; use --runtime auto or onnx "
          "with it, not --runtime tf")
    for model in self.models:
      inference.check_settings(model, self.batch_size, self.top_k)

  @staticmethod
  def add_flags(parser) -> None:
    """Adds the model, photo, fetch, batch, taxonomy, prior and shard
    flags."""
    models_lib.add_flags(parser)
    inference.add_flags(parser)
    photos.PhotoConfig.add_flags(parser)
    quantize.QuantizationConfig.add_flags(parser)
    taxonomy_lib.TaxonomyConfig.add_flags(parser)
    prior_lib.PriorConfig.add_flags(parser)
    parser.add_argument(
        "--shard_rows", type=int, default=sinks.DEFAULT_SHARD_ROWS,
        help="rows per Parquet shard; each shard is closed when full, so a "
        "rerun after a dead run reuses it")

  @classmethod
  def from_args(cls, args, model_root: Optional[str]) -> "EmbedConfig":
    """Builds the config from parsed flags; no I/O.

    Raises:
      config.ConfigError: naming the flag that is wrong (a ``ModelError``
        for an unknown or unlocated model).
    """
    models = models_lib.from_args(args, model_root)
    return cls(
        models=models,
        photos=photos.PhotoConfig.from_args(
            args, photos.needed_policies([m.resize for m in models]),
            models[0].spec.input_size),
        batch_size=args.batch_size, top_k=args.top_k,
        shard_rows=args.shard_rows,
        quantization=quantize.QuantizationConfig.from_args(args),
        taxonomy=taxonomy_lib.TaxonomyConfig.from_args(args),
        prior=prior_lib.PriorConfig.from_args(args))

  @property
  def color_profile(self) -> str:
    return self.photos.color_profile

  def with_models(self, models) -> "EmbedConfig":
    """The same settings with other (decided) models."""
    return dataclasses.replace(self, models=tuple(models))

  def photo_config(self, expected_total: Optional[int] = None,
                   run_id: Optional[str] = None) -> photos.PhotoConfig:
    """The photo settings with this run's size and id, for progress."""
    return dataclasses.replace(self.photos, expected_total=expected_total,
                               run_id=run_id)

  def inference_config(self, model: models_lib.ResolvedModel
                       ) -> inference.InferenceConfig:
    return inference.InferenceConfig(model, self.batch_size, self.top_k)


class EmbedAndWrite(beam.PTransform):
  """PCollection[ImageRef] -> staged tables, one per model, plus errors.

  Each photo is read, decoded and prepared once; each model then sees the
  photos routed to it (``ImageRef.models``) in batches.

  Returns:
    A dict of PCollections: ``written`` (paths of the closed shards),
    ``error_tables`` (the error rows, as pyarrow Tables, reused ones
    included), ``loads`` ((model name, loads) per worker process) and
    ``tallies`` (``("reused_photos", 1)`` per photo resume reused, for the
    run summary).
  """

  def __init__(self, embed_config: EmbedConfig, layout: commit.Layout,
               carried: sinks.Carried = (),
               expected_total: Optional[int] = None,
               resume: Optional[resume_lib.ResumePlan] = None,
               web: bool = True):
    """Args: web: whether the input may hold http(s) photos (False for a
    glob: ``ReadAndPrepare`` then builds no keyed branch)."""
    super().__init__()
    self._config = embed_config
    self._layout = layout
    self._carried = carried
    self._expected_total = expected_total
    self._resume = resume or resume_lib.ResumePlan()
    self._web = web

  def expand(self, refs):
    cfg, layout, carried = self._config, self._layout, self._carried
    written, error_tables, tallies = [], [], []
    if self._resume.shards:
      reused = refs | "LeaveOutReused" >> resume_lib.LeaveOutReused(
          self._resume, layout.tables)
      refs = reused[resume_lib.TODO]
      written.append(reused[resume_lib.WRITTEN])
      error_tables.append(reused[resume_lib.ERROR_ROWS])
      tallies.append(reused[resume_lib.TALLIES])
    else:
      tallies.append(refs.pipeline | "NoReused" >> beam.Create([]))
    prepped = refs | "ReadAndPrepare" >> photos_keyed.ReadAndPrepare(
        cfg.photo_config(self._expected_total, layout.run_id), web=self._web)
    error_streams, loads = [prepped.errors], []
    for model in cfg.models:
      table = layout.model_table(model)
      held = shared.Shared()  # one load per process for every branch
      for branch, photos_in in prepped.branches.items():
        outputs = (photos_in
                   | f"RunModel{branch}[{model.name}]" >> inference.RunModel(
                       cfg.inference_config(model), shared_handle=held))
        written.append(
            outputs.results
            | f"ToArrow{branch}[{model.name}]" >> beam.Map(
                sinks.results_to_table, table.schema, carried)
            | f"Write{branch}[{model.name}]" >> sinks.WriteTable(
                table.staged, table.schema, cfg.shard_rows))
        error_streams.append(outputs.errors)
        loads.append(outputs[inference.LOADS_TAG])
    errors = layout.table(sinks.ERRORS)
    new_errors = (tuple(error_streams)
                  | "AllErrors" >> beam.Flatten()
                  | "BatchErrors" >> beam.BatchElements(min_batch_size=1,
                                                        max_batch_size=1000)
                  | "ErrorsToArrow" >> beam.Map(
                      sinks.errors_to_table, errors.schema, carried))
    written.append(new_errors | "WriteErrors" >> sinks.WriteTable(
        errors.staged, errors.schema, cfg.shard_rows))
    error_tables.append(new_errors)
    return {
        WRITTEN: tuple(written) | "AllWritten" >> beam.Flatten(),
        ERROR_TABLES: tuple(error_tables) | "AllErrorRows" >> beam.Flatten(),
        LOADS: tuple(loads) | "AllLoads" >> beam.Flatten(),
        TALLIES: tallies[0],
    }
