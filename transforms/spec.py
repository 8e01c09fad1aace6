"""What a run is: each model as decided, and the settings that change rows.

A table's rows depend on more than its columns: which model files made
them, on which runtime and at which precision, how the photos were decoded
and prepared, and how many labels a classifier keeps.  ``RunSpec`` holds
exactly those.  The launcher builds it once (``for_run``, called by
``pipelines.launch.plan_job`` after every model's runtime is decided), and
it is then

* written into every table's Parquet metadata (``transforms.sinks``: key
  ``natvision``, field ``spec``) and into run.json (field ``spec``);
* read back by resume (``transforms.resume``: a dead attempt's shard is
  reused only when its recorded spec equals this run's) and by search
  (``tools.query``: a query photo is embedded as the table's spec says,
  int8 included).

Equality is by value (frozen dataclasses), and ``to_json`` is deterministic
(sorted keys, no spaces), so "made the same way" is one comparison rather
than a list of metadata fields kept in step by hand.

What changes rows, and so is here: per model its location and the
fingerprint of its files, the runtime, the precision (with the int8 file,
whose name hashes its calibration photos), the preparation policy, the
input size, the output width, the labelmap and, for classifiers, top-k
and, with ``--taxa``, the fingerprint of the labels' taxa and the roll-up
threshold (``taxa_fingerprint``, ``rollup_threshold``: another taxonomy or
threshold gives other taxon and roll-up columns);
for the run the colour-profile handling, the size limits that turn a photo
into an error row (``--max_file_bytes``, ``--max_pixels``) and the package
version (another version of the code may prepare photos differently).

What is left out, on purpose:

* ``--batch_size``: a photo's row does not depend on its batch beyond the
  float rounding of the kernels' sums, which is within the runtime's
  tolerance (``DecidedModel.tolerance``; tests/test_field_inputs.py compares
  one photo embedded in two batches).  A run mixes batch shapes already
  (``BatchElements`` and the last batch of a bundle), so resuming with
  another batch size mixes no rows made two ways.
* the fp32 ONNX file's path: the file is a conversion of the model files
  (named by ``fingerprint``) checked against TensorFlow within the
  tolerance, and its cache path differs from one machine to the next.
* threads, fetch, retry and shard settings: they change how fast rows are
  made, not what they hold.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from natvision import transforms
from natvision.transforms import models as models_lib
from natvision.transforms.runtimes import base


class SpecError(ValueError):
  """A recorded spec that cannot be read (another shape, a missing field)."""


@dataclasses.dataclass(frozen=True)
class DecidedModel:
  """One model as the launcher decided it, as far as its rows depend on it.

  Attributes:
    name: the registry name.
    kind: ``embedder`` or ``classifier``.
    location: the model's folder (local or a bucket).
    fingerprint: 32 hex digits of its files
      (``transforms.runtimes.base.model_fingerprint``).
    runtime: ``tf`` or ``onnx``.
    precision: ``fp32`` or ``int8``.
    int8_file: with int8, the quantized ONNX file the launcher checked (its
      name hashes the fingerprint and the calibration photos); None for
      fp32.
    resize: the preparation policy (``squash`` or ``center_crop``).
    input_size: the square input's side, in pixels.
    output_width: the embedding's length or the number of classes.
    labelmap: a classifier's labelmap file; None for embedders.
    top_k: labels kept per photo by a classifier; None for embedders.
    tolerance: the largest ``runtimes.output_difference`` between two
      computations of one photo's row under this spec (other batch shapes,
      another process); ``runtimes.TOLERANCES`` of the model's kind.
    taxa_fingerprint: with ``--taxa``, a classifier's
      ``taxonomy.LabelTaxa.fingerprint`` (32 hex digits of its labels' taxa
      and their ancestors); None otherwise.
    rollup_threshold: with ``--taxa``, ``--rollup_threshold``; None
      otherwise.
  """

  name: str
  kind: str
  location: str
  fingerprint: str
  runtime: str
  precision: str
  int8_file: Optional[str]
  resize: str
  input_size: int
  output_width: int
  labelmap: Optional[str]
  top_k: Optional[int]
  tolerance: float
  taxa_fingerprint: Optional[str] = None
  rollup_threshold: Optional[float] = None

  def __post_init__(self):
    if self.runtime not in base.DECIDED:
      raise SpecError(f"model {self.name}: runtime is tf or onnx, not "
                      f"{self.runtime!r}")
    if self.precision not in base.PRECISIONS:
      raise SpecError(f"model {self.name}: precision is fp32 or int8, not "
                      f"{self.precision!r}")
    if (self.precision == base.INT8) != (self.int8_file is not None):
      raise SpecError(f"model {self.name}: an int8 file goes with int8 "
                      f"precision and only with it")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything that decides a run's rows (see the module docstring).

  Attributes:
    models: the job's models in ``--models`` order.
    color_profile: ``ignore`` or ``srgb`` (``--color_profile``).
    max_file_bytes: larger files became error rows.
    max_pixels: photos declaring more pixels became error rows.
    version: the natvision version that made the rows.
  """

  models: Tuple[DecidedModel, ...]
  color_profile: str
  max_file_bytes: int
  max_pixels: int
  version: str

  def model(self, name: str) -> DecidedModel:
    """The model called ``name``.

    Raises:
      KeyError: the run has no such model.
    """
    for model in self.models:
      if model.name == name:
        return model
    raise KeyError(f"the run has no model {name!r} (it has "
                   f"{', '.join(m.name for m in self.models)})")

  def to_dict(self) -> Dict[str, Any]:
    """Plain JSON types: dicts, lists, strings, numbers, None."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Dict[str, Any]) -> "RunSpec":
    """The spec ``to_dict`` wrote.

    Raises:
      SpecError: not the shape ``to_dict`` writes (missing or unknown
        fields, wrong values).
    """
    try:
      fields = dict(data)
      fields["models"] = tuple(DecidedModel(**m) for m in fields["models"])
      return cls(**fields)
    except (KeyError, TypeError) as e:
      raise SpecError(f"not a run spec: {e}") from e

  def to_json(self) -> str:
    """Deterministic JSON: equal specs give equal strings."""
    return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

  @classmethod
  def from_json(cls, text: str) -> "RunSpec":
    """The spec ``to_json`` wrote.

    Raises:
      SpecError: not JSON, or not a spec.
    """
    try:
      data = json.loads(text)
    except ValueError as e:
      raise SpecError(f"not a run spec: {e}") from e
    if not isinstance(data, dict):
      raise SpecError("not a run spec: not a JSON object")
    return cls.from_dict(data)

  def differences(self, other: "RunSpec") -> List[str]:
    """What differs from ``other``, one ``field: mine != other`` a line,
    for log lines; [] when the two are equal."""
    mine, theirs = _flat(self.to_dict()), _flat(other.to_dict())
    return [f"{key}: {mine.get(key)!r} != {theirs.get(key)!r}"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)]


def _flat(data: Dict[str, Any]) -> Dict[str, Any]:
  flat = {k: v for k, v in data.items() if k != "models"}
  for model in data["models"]:
    for key, value in model.items():
      flat[f"models[{model['name']}].{key}"] = value
  return flat


def decided_model(model: models_lib.ResolvedModel, top_k: int,
                  fingerprint: Optional[str] = None) -> DecidedModel:
  """One decided model's part of the spec.

  Args:
    model: a model carrying its runtime decision.
    top_k: ``--top_k`` (kept for classifiers only).
    fingerprint: of the model's files; by default the decision's, or
      computed from the files (staged locally when on a bucket).

  Raises:
    ValueError: the model carries no decision.
  """
  decision = model.require_decision()
  if fingerprint is None:
    fingerprint = decision.fingerprint or base.model_fingerprint(
        models_lib.stage_locally(model.path))
  classifier = model.spec.kind == models_lib.CLASSIFIER
  taxa = model.label_taxa if classifier else None
  return DecidedModel(
      name=model.name, kind=model.spec.kind, location=model.path,
      fingerprint=fingerprint, runtime=decision.runtime,
      precision=decision.precision,
      int8_file=decision.onnx_path if decision.precision == base.INT8
      else None,
      resize=model.resize, input_size=model.spec.input_size,
      output_width=model.spec.output_width,
      labelmap=model.labelmap_path if classifier else None,
      top_k=top_k if classifier else None,
      tolerance=base.TOLERANCES[model.spec.kind],
      taxa_fingerprint=(taxa.fingerprint if taxa is not None else None),
      rollup_threshold=(taxa.threshold if taxa is not None else None))


def for_run(config) -> RunSpec:
  """The run's spec, from its decided models and photo settings.

  Called once, by the launcher, after the runtimes are decided.

  Args:
    config: the job's ``transforms.embed.EmbedConfig`` with decided models
      (not imported: embed builds on this module, through commit).

  Raises:
    ValueError: a model carries no decision.
  """
  return RunSpec(
      models=tuple(decided_model(m, config.top_k) for m in config.models),
      color_profile=config.photos.color_profile,
      max_file_bytes=config.photos.max_file_bytes,
      max_pixels=config.photos.max_pixels,
      version=transforms.__version__)
