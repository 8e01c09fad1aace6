"""The run summary, as the report reads it: one typed reader for both jobs.

``natvision-embed`` writes ``OUT/run.json`` (pipelines/embed_images.py,
``WriteSummary``) and ``natvision-ingest`` writes ``OUT/runs/<date>.json``
(pipelines/ingest_observations.py, ``FinishPartition``); both take their
``errors``, ``model_loads`` and counts from transforms/summary.py and their
``timings`` from transforms/commit.py.  Where their fields mean the same,
``RunSummary`` gives them one name; where they differ:

* the models: embed's ``models`` is the list of ``ResolvedModel.describe()``
  (kind, runtime, preparation, width, ``standin``) and its ``rows`` maps a
  table (``embeddings/<model>``) to its rows; ingest keeps that list as
  ``model_details`` and its ``models`` is a dict of per-model counts of the
  partition (``new``, ``done_before``, ``held_back``, ``rows``, ``failed``).
  ``ModelRun`` holds both, None where a job does not count a figure;
* photos and the rate: embed counts the photos sent on (``inputs``, reused
  ones included) and ``images_per_second`` = inputs / ``elapsed_s``;
  ingest counts photos per model only, so ``photos`` and
  ``photos_per_second`` are None for it (a model's ``new`` is not the
  run's photos: a photo can go to several models);
* the partition: ingest's ``partition`` (``snapshot_date=...``) and
  ``snapshot_date``; embed has neither.  ``started_ts`` is embed's only
  (ingest drops it), and ``elapsed_s`` is both jobs' time from the start of
  the pipeline (after the model checks) to the end of the commit.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Optional, Tuple

from natvision.transforms import commit
from natvision.transforms import storage

EMBED = "embed"
INGEST = "ingest"


@dataclasses.dataclass(frozen=True)
class ModelRun:
  """One model as the run summary has it.

  Attributes:
    name: registry name.
    kind: ``embedder`` or ``classifier`` ("" when the summary has no
      details).
    runtime: ``tf`` or ``onnx`` ("" when unknown).
    preparation: ``squash`` or ``center_crop`` ("" when unknown).
    output_width: floats per embedding or classes (None when unknown).
    precision: ``fp32`` or ``int8`` ("" when unknown).
    standin: a stand-in model (the demo): its outputs mean nothing.
    rows: rows of the model's table this run committed (embed: the whole
      table; ingest: the partition).
    new: ingest only: photos this run sent to the model.
    done_before: ingest only: photos done in earlier partitions.
    failed: ingest only: new photos without a row.
  """

  name: str
  kind: str = ""
  runtime: str = ""
  preparation: str = ""
  output_width: Optional[int] = None
  precision: str = ""
  standin: bool = False
  rows: Optional[int] = None
  new: Optional[int] = None
  done_before: Optional[int] = None
  failed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ErrorCounts:
  """The summary's ``errors`` (transforms/summary.py, ``ErrorBreakdownFn``).

  Attributes:
    total: error rows.
    photos: distinct photos with an error row (None when not counted).
    by_stage: stage -> rows.
    by_model: model (or ``(before any model)``) -> rows.
    by_reason: ``"<stage>: <message, URI taken out>"`` -> rows, the
      ``summary.TOP_REASONS`` most frequent only.
  """

  total: int
  photos: Optional[int]
  by_stage: Dict[str, int]
  by_model: Dict[str, int]
  by_reason: Dict[str, int]

  @classmethod
  def from_dict(cls, raw: dict) -> "ErrorCounts":
    return cls(total=int(raw.get("total", sum(raw.get("by_stage", {})
                                              .values()))),
               photos=raw.get("photos"),
               by_stage=dict(raw.get("by_stage", {})),
               by_model=dict(raw.get("by_model", {})),
               by_reason=dict(raw.get("by_reason", {})))


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """What the report uses of either job's summary.

  Attributes:
    job: ``embed`` or ``ingest``.
    output_dir, run_id: as the job wrote them.
    partition: ingest's ``snapshot_date=YYYY-MM-DD``; None for embed.
    started, ended: ISO 8601 times, to the second ("" when absent).
    elapsed_s: seconds from the pipeline's start to the commit's end.
    photos: embed's ``inputs``; None for ingest (see the module).
    photos_per_second: embed's ``images_per_second`` (photos / elapsed_s,
      as the job printed it); None for ingest.  The one rate of the page.
    models: per model, in the summary's order.
    errors: None when the summary has no ``errors``.
    timings: phase (``launch``, ``model_checks``, ``pipeline``,
      ``commit``) -> seconds, in that order; {} when absent.
    model_loads: model -> loads (one per worker process).
  """

  job: str
  output_dir: str = ""
  run_id: str = ""
  partition: Optional[str] = None
  started: str = ""
  ended: str = ""
  elapsed_s: Optional[float] = None
  photos: Optional[int] = None
  photos_per_second: Optional[float] = None
  models: Tuple[ModelRun, ...] = ()
  errors: Optional[ErrorCounts] = None
  timings: Dict[str, float] = dataclasses.field(default_factory=dict)
  model_loads: Dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def standin(self) -> bool:
    """Any model was a stand-in."""
    return any(m.standin for m in self.models)

  @classmethod
  def from_dict(cls, raw: dict) -> "RunSummary":
    """Reads either job's summary (run.json or runs/<date>.json)."""
    ingest = isinstance(raw.get("models"), dict) or "snapshot" in raw
    details = raw.get("model_details") if ingest else raw.get("models")
    counts = raw.get("models") if ingest else {}
    rows = {} if ingest else {k.rsplit("/", 1)[-1]: v
                              for k, v in (raw.get("rows") or {}).items()}
    names = [d.get("name") for d in details or []]
    names += [n for n in counts or {} if n not in names]
    by_name = {d.get("name"): d for d in details or []}
    models = []
    for name in names:
      d, c = by_name.get(name, {}), (counts or {}).get(name, {})
      models.append(ModelRun(
          name=name, kind=d.get("kind", ""), runtime=d.get("runtime", ""),
          preparation=d.get("resize", ""),
          output_width=d.get("output_width"),
          precision=d.get("precision") or "",
          standin=bool(d.get("standin")),
          rows=c.get("rows") if ingest else rows.get(name),
          new=c.get("new"), done_before=c.get("done_before"),
          failed=c.get("failed")))
    timings = raw.get("timings") or {}
    return cls(
        job=INGEST if ingest else EMBED,
        output_dir=raw.get("output_dir", ""),
        run_id=raw.get("run_id", ""),
        partition=raw.get("partition") if ingest else None,
        started=raw.get("started", ""),
        ended=raw.get("ended", ""),
        elapsed_s=raw.get("elapsed_s"),
        photos=None if ingest else raw.get("inputs"),
        photos_per_second=None if ingest else raw.get("images_per_second"),
        models=tuple(models),
        errors=(ErrorCounts.from_dict(raw["errors"]) if raw.get("errors")
                else None),
        timings={p: float(timings[p]) for p in commit.TIMING_PHASES
                 if p in timings},
        model_loads=dict(raw.get("model_loads") or {}))


def read_summary(path: str) -> Optional[RunSummary]:
  """The summary at ``path`` (any Beam filesystem); None when there is none.

  Raises:
    json.JSONDecodeError: the file is not JSON.
    storage.StorageError: the existence check or the read failed.
  """
  if not storage.exists(path):
    return None
  return RunSummary.from_dict(json.loads(storage.read_bytes(path)))
