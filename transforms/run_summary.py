"""The run summary: one typed definition for both jobs' ``run.json``.

``natvision-embed`` writes ``OUT/run.json`` and ``natvision-ingest``
writes ``OUT/runs/<date>.json``; both write a ``RunSummary`` (``write``),
in the pipeline's last step, and every reader reads it back through the
same type (``read``): the launcher's printed lines and exit status
(pipelines/), the report (tools/report.py) and the benchmarks.  The
fields are the same for both jobs; a figure one job does not count is
None (``inputs`` for ingestion, the snapshot for embed), never left out,
so the JSON has one shape, marked ``version`` (``SUMMARY_VERSION``).

How the summary is made:

* the launcher (pipelines/launch.py ``plan_job``) starts it with what it
  knows before the run: package, flags, the run spec
  (transforms/spec.py, as ``RunSpec.to_dict()``), the start-up
  ``timings``, taxonomy and prior reports;
* the job's ``plan`` adds the run id, start time, output folder, the
  models as decided (``ModelSummary.from_described``) and the job's own
  launch-time fields (the partition, filters, earlier partitions ...);
* the job's last step (after the commit) adds the figures counted in the
  graph (transforms/summary.py: ``errors``, ``model_loads``, tallies) and
  rows per table read from the committed files' footers, and writes it.

Older summaries (no ``version``: natvision-embed's with ``models`` a list
and ``rows`` per table, natvision-ingest's with ``models`` a dict of counts
and ``model_details`` a list) are read into the same type
(``RunSummary.from_dict``), so a report of an earlier partition still
reads that partition's file.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from natvision.transforms import commit
from natvision.transforms import storage

SUMMARY_VERSION = 2
EMBED = "embed"
INGEST = "ingest"
JOBS = (EMBED, INGEST)


class SummaryError(ValueError):
  """A summary that cannot be read as a ``RunSummary`` (says why)."""


def _known(cls, raw: dict) -> dict:
  """The entries of ``raw`` that are fields of ``cls`` (a summary written
  by a later version may carry more; they are not read)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in raw.items() if k in names}


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """One model of the run: how it was decided, and its table's figures.

  The first fields are ``ResolvedModel.describe()``'s (transforms/models.py;
  ``from_described`` takes exactly those), then the counts.

  Attributes:
    name: registry name.
    kind: ``embedder`` or ``classifier``.
    format, path, labelmap, licence, source: the model's files (``path``
      absolute, see docs/models.md).
    output_width: floats per embedding, or classes.
    input_size: pixels of the square the photo is prepared to.
    resize: the preparation, ``squash`` or ``center_crop``.
    taxa_fingerprint, prior_fingerprint: with ``--taxa`` / ``--prior``.
    runtime: ``tf`` or ``onnx``; runtime_note: why.
    precision: ``fp32`` or ``int8``; agreement: int8's check against
      fp32 (``runtimes.base.Agreement.as_dict()``), or None.
    standin: a stand-in model (the demo): its outputs mean nothing.
    table: the model's table, ``embeddings/<name>`` or
      ``predictions/<name>``.
    rows: rows this run committed to the table (embed: the whole table;
      ingest: the partition); None before the run ended.
    new: ingest: photos of the partition sent to the model.
    done_before: ingest: photos done in earlier partitions.
    held_back: ingest: photos that failed ``--max_attempts`` times.
    failed: ingest: new photos without a row (``new - rows``, at least 0).
    route: ingest: the taxa a ``--route`` limits the model to, or None.
  """

  name: str
  kind: str = ""
  format: str = ""
  path: str = ""
  output_width: Optional[int] = None
  input_size: Optional[int] = None
  resize: str = ""
  labelmap: Optional[str] = None
  taxa_fingerprint: Optional[str] = None
  prior_fingerprint: Optional[str] = None
  licence: Optional[str] = None
  source: Optional[str] = None
  runtime: str = ""
  runtime_note: Optional[str] = None
  precision: Optional[str] = None
  agreement: Optional[Dict[str, Any]] = None
  standin: bool = False
  table: str = ""
  rows: Optional[int] = None
  new: Optional[int] = None
  done_before: Optional[int] = None
  held_back: Optional[int] = None
  failed: Optional[int] = None
  route: Optional[List[int]] = None

  @classmethod
  def from_described(cls, described: Dict[str, Any], table: str,
                     standin: bool = False) -> "ModelSummary":
    """From ``ResolvedModel.describe()``.

    Raises:
      TypeError: ``described`` has a field this type does not (add it
        here, and to docs/tables.md).
    """
    return cls(**described, table=table, standin=standin)

  def to_dict(self) -> Dict[str, Any]:
    """JSON-friendly, without ``name`` (the key of ``models``)."""
    out = dataclasses.asdict(self)
    del out["name"]
    return out


@dataclasses.dataclass(frozen=True)
class ErrorCounts:
  """The summary's ``errors`` (transforms/summary.py, ``Summarize``).

  Attributes:
    total: error rows.
    photos: distinct photos with an error row (None when not counted).
    by_stage: stage -> rows.
    by_model: model (or ``(before any model)``) -> rows.
    by_reason: ``"<stage>: <message, URI taken out>"`` -> rows, the
      ``summary.TOP_REASONS`` most frequent only.
  """

  total: int = 0
  photos: Optional[int] = None
  by_stage: Dict[str, int] = dataclasses.field(default_factory=dict)
  by_model: Dict[str, int] = dataclasses.field(default_factory=dict)
  by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, raw: dict) -> "ErrorCounts":
    return cls(total=int(raw.get("total", sum(raw.get("by_stage", {})
                                              .values()))),
               photos=raw.get("photos"),
               by_stage=dict(raw.get("by_stage") or {}),
               by_model=dict(raw.get("by_model") or {}),
               by_reason=dict(raw.get("by_reason") or {}))

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """Either job's run summary (run.json, runs/<date>.json).

  Attributes (None: not counted by this job, or not yet known):
    version: ``SUMMARY_VERSION`` of the shape.
    job: ``embed`` or ``ingest``.
    package: ``{"name", "version"}`` of the code that ran.
    run_id, output_dir: the run and its ``--output_dir``.
    flags: the command line.
    spec: the run spec, ``spec.RunSpec.to_dict()`` (``run_spec()``).
    started, ended: ISO 8601 times, to the second; started_ts: the start
      as seconds since the epoch.
    elapsed_s: the pipeline's start (after the model checks) to the
      commit's end.
    timings: phase (``commit.TIMING_PHASES``) -> seconds.
    models: per model, in the order given.
    errors: error rows by stage, model and reason.
    model_loads: model -> loads (one per worker process).
    filtered_by_license: photos left out by ``--license``.
    taxonomy, prior: per classifier with ``--taxa`` / ``--prior``, the
      labels' match (transforms/taxonomy.py) and the prior table
      (transforms/prior.py).
    inputs: embed: photos sent on (reused ones included).
    images_per_second: embed: inputs / elapsed_s.
    error_rate: embed: photos with an error row / inputs;
      max_error_rate: ``--max_error_rate``.
    reused_photos: embed: photos whose rows resume copied from a dead
      attempt.
    skipped_sound, skipped_video, skipped_no_image_format,
      skipped_other_type, skipped_bad_lines: embed: rows of a Darwin Core
      archive not fetched, by reason (transforms/dwca.py);
      bad_lines: the first of those lines, ``file:line: why``.
    warnings: embed: the input's warnings.
    partition, snapshot_date, snapshot_dir, summary_path: ingest: the
      partition run (``snapshot_date=YYYY-MM-DD``), its date, the
      snapshot and where this summary lies.
    snapshot: ingest: the snapshot's counts (photo rows, observations,
      taxa, passed and filtered, bad rows per table, subtree sizes).
    filters: ingest: the filters (``SnapshotFilters.describe()``).
    max_attempts: ingest: ``--max_attempts``.
    earlier_partitions: ingest: partitions found before this one.
    stale_staging_removed: ingest: dead runs' staging folders removed.
  """

  job: str
  version: int = SUMMARY_VERSION
  package: Dict[str, str] = dataclasses.field(default_factory=dict)
  run_id: str = ""
  output_dir: str = ""
  flags: List[str] = dataclasses.field(default_factory=list)
  spec: Optional[Dict[str, Any]] = None
  started: str = ""
  started_ts: Optional[float] = None
  ended: str = ""
  elapsed_s: Optional[float] = None
  timings: Dict[str, float] = dataclasses.field(default_factory=dict)
  models: Tuple[ModelSummary, ...] = ()
  errors: Optional[ErrorCounts] = None
  model_loads: Dict[str, int] = dataclasses.field(default_factory=dict)
  filtered_by_license: Optional[int] = None
  taxonomy: Optional[Dict[str, Any]] = None
  prior: Optional[Dict[str, Any]] = None
  # natvision-embed
  inputs: Optional[int] = None
  images_per_second: Optional[float] = None
  error_rate: Optional[float] = None
  max_error_rate: Optional[float] = None
  reused_photos: Optional[int] = None
  skipped_sound: Optional[int] = None
  skipped_video: Optional[int] = None
  skipped_no_image_format: Optional[int] = None
  skipped_other_type: Optional[int] = None
  skipped_bad_lines: Optional[int] = None
  bad_lines: Optional[List[str]] = None
  warnings: Optional[List[str]] = None
  # natvision-ingest
  partition: Optional[str] = None
  snapshot_date: Optional[str] = None
  snapshot_dir: Optional[str] = None
  summary_path: Optional[str] = None
  snapshot: Optional[Dict[str, Any]] = None
  filters: Optional[Dict[str, Any]] = None
  max_attempts: Optional[int] = None
  earlier_partitions: Optional[List[str]] = None
  stale_staging_removed: Optional[List[str]] = None

  def __post_init__(self):
    if self.job not in JOBS:
      raise SummaryError(f"a run summary's job is one of {JOBS}, not "
                         f"{self.job!r}")

  @property
  def standin(self) -> bool:
    """Any model was a stand-in."""
    return any(m.standin for m in self.models)

  def model(self, name: str) -> ModelSummary:
    """The model called ``name``.

    Raises:
      KeyError: no such model in this run.
    """
    for m in self.models:
      if m.name == name:
        return m
    raise KeyError(f"no model {name!r} in the run summary (models: "
                   f"{', '.join(m.name for m in self.models) or 'none'})")

  def to_dict(self) -> Dict[str, Any]:
    """The JSON written (every field; ``models`` a dict by name)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["models"] = {m.name: m.to_dict() for m in self.models}
    out["errors"] = None if self.errors is None else self.errors.to_dict()
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=False)

  @classmethod
  def from_dict(cls, raw: Dict[str, Any]) -> "RunSummary":
    """Reads a summary of this shape or an older one (see the module).

    Raises:
      SummaryError: not a run summary (no ``models``, or an unknown job).
    """
    if not isinstance(raw, dict):
      raise SummaryError(f"a run summary is a JSON object, not "
                         f"{type(raw).__name__}")
    if raw.get("version") is None:
      raw = _from_version_1(raw)
    models = raw.get("models") or {}
    if not isinstance(models, dict):
      raise SummaryError("a run summary's models are an object by name")
    fields = _known(cls, raw)
    fields["models"] = tuple(
        ModelSummary(**dict(_known(ModelSummary, entry or {}), name=name))
        for name, entry in models.items())
    if raw.get("errors") is not None:
      fields["errors"] = ErrorCounts.from_dict(raw["errors"])
    timings = raw.get("timings") or {}
    fields["timings"] = {p: float(timings[p]) for p in commit.TIMING_PHASES
                         if p in timings}
    return cls(**fields)

  def run_spec(self):
    """The run's ``spec.RunSpec``; None when the summary has none.

    Raises:
      spec.SpecError: the recorded spec is not one this version reads.
    """
    from natvision.transforms import spec as spec_lib  # pylint: disable=import-outside-toplevel
    return None if self.spec is None else spec_lib.RunSpec.from_dict(
        self.spec)


def _from_version_1(raw: Dict[str, Any]) -> Dict[str, Any]:
  """A summary written before ``version`` (both jobs' shapes) as version 2."""
  out = dict(raw)
  ingest = isinstance(raw.get("models"), dict) or "snapshot" in raw
  if ingest:
    details = raw.get("model_details") or []
    counts = raw.get("models") or {}
  else:
    details = raw.get("models") or []
    counts = {key.rsplit("/", 1)[-1]: {"table": key, "rows": rows}
              for key, rows in (raw.get("rows") or {}).items()}
  names = [d.get("name") for d in details]
  names += [n for n in counts if n not in names]
  by_name = {d.get("name"): d for d in details}
  out["models"] = {name: dict(by_name.get(name, {}),
                              **(counts.get(name) or {}))
                   for name in names}
  out["job"] = INGEST if ingest else EMBED
  out["version"] = 1
  return out


def write(path: str, summary: RunSummary) -> None:
  """Writes ``summary`` to ``path`` (any Beam filesystem), as JSON.

  Raises:
    storage.StorageError: the write failed.
  """
  storage.write_bytes(path, summary.to_json().encode("utf-8"))


def read(path: str) -> Optional[RunSummary]:
  """The summary at ``path`` (any Beam filesystem); None when there is none.

  Raises:
    json.JSONDecodeError: the file is not JSON.
    SummaryError: the JSON is not a run summary.
    storage.StorageError: the existence check or the read failed.
  """
  if not storage.exists(path):
    return None
  return RunSummary.from_dict(json.loads(storage.read_bytes(path)))
