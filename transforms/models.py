"""Registry of the known models, and the code that finds and checks them.

The three seed models (../shared/seeds) are registered by name, each with
its format: the legacy TF1 Hub format (a SavedModel with the empty tag set,
a ``tfhub_module.pb`` marker and a ``default`` signature taking
``images=``) or a TF2 SavedModel.  A model is found at
``<model_root>/<name>/`` (a local folder or a bucket) or at an explicit
handle given per model; a remote folder is copied to a local cache
(``stage_locally``).  Classifiers' labelmaps are read here too.

Loading is the runtimes' (transforms/runtimes/: TensorFlow in ``tf.py``),
which build on this module; nothing here imports them, nor TensorFlow, so
flag parsing and graph construction stay cheap.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems

from natvision.transforms import config
from natvision.transforms import storage
# The preparation policies are preprocess's; the registry names them, and
# they stay importable from here.
from natvision.transforms.preprocess import (RESIZE_CENTER_CROP, RESIZE_POLICIES,
                                   RESIZE_SQUASH)

EMBEDDER = "embedder"
CLASSIFIER = "classifier"
TF1_HUB = "tf1_hub"
TF2_SAVED_MODEL = "tf2_saved_model"

# What --runtime may ask for; transforms/runtimes decides between tf and onnx.
RUNTIME_REQUESTS = ("auto", "tf", "onnx")

TF1_MODULE_MARKER = "tfhub_module.pb"
DEFAULT_LABELMAP = "labelmap.csv"


class ModelError(config.ConfigError):
  """A model is missing, malformed, or does not match its registry entry."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the project knows about one model before loading it.

  Attributes:
    name: registry name, also the folder name under ``--model_root``.
    kind: ``embedder`` (writes the embeddings table) or ``classifier``
      (writes the predictions table).
    model_format: ``tf1_hub`` or ``tf2_saved_model``.
    signature: signature to call for TF1 Hub models; ``None`` for TF2
      SavedModels, which are called directly (``obj(images)``).
    input_key: name of the image input of the signature.
    output_key: key of the output in the signature's result dict.
    input_size: height and width of the square input, in pixels.
    output_width: length of the embedding, or number of classes.
    resize: default photo preparation (``squash`` or ``center_crop``).
    licence: licence of the published weights.
    source: where the model was published.
    labelmap: file name of the classifier's labelmap inside its folder.
  """

  name: str
  kind: str
  model_format: str
  signature: Optional[str]
  input_key: str
  output_key: str
  input_size: int
  output_width: int
  resize: str
  licence: str
  source: str
  labelmap: Optional[str] = None

  def __post_init__(self):
    if self.kind not in (EMBEDDER, CLASSIFIER):
      raise ValueError(f"model {self.name}: kind must be embedder or classifier")
    if self.model_format not in (TF1_HUB, TF2_SAVED_MODEL):
      raise ValueError(f"model {self.name}: unknown format {self.model_format}")
    if self.resize not in RESIZE_POLICIES:
      raise ValueError(f"model {self.name}: unknown resize {self.resize}")
    if self.kind == CLASSIFIER and not self.labelmap:
      raise ValueError(f"model {self.name}: a classifier needs a labelmap")


REGISTRY: Dict[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec(
            name="inaturalist_v2",
            kind=EMBEDDER,
            model_format=TF1_HUB,
            signature="default",
            input_key="images",
            output_key="default",
            input_size=299,
            output_width=64,
            # iNaturalist's own vision service resizes the short side to
            # 299/0.875 and crops the centre.
            resize=RESIZE_CENTER_CROP,
            licence="CC BY-NC 4.0",
            source="https://tfhub.dev/inaturalist/vision/embedder/inaturalist_V2/1",
        ),
        ModelSpec(
            name="fungi_mobile_v1",
            kind=CLASSIFIER,
            model_format=TF1_HUB,
            signature="default",
            input_key="images",
            output_key="default",
            input_size=299,
            output_width=4128,
            resize=RESIZE_SQUASH,
            licence="CC BY-NC 4.0",
            source="https://tfhub.dev/svampeatlas/vision/classifier/fungi_mobile_V1/2",
            labelmap=DEFAULT_LABELMAP,
        ),
        ModelSpec(
            name="inception_resnet_v2",
            kind=EMBEDDER,
            model_format=TF2_SAVED_MODEL,
            signature=None,
            input_key="images",
            output_key="default",
            input_size=299,
            output_width=1536,
            resize=RESIZE_SQUASH,
            licence="Apache 2.0",
            source="https://tfhub.dev/google/imagenet/inception_resnet_v2/feature_vector/4",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
  try:
    return REGISTRY[name]
  except KeyError:
    raise ModelError(
        f"unknown model {name!r}; --models takes a comma-separated list of "
        f"{', '.join(sorted(REGISTRY))}") from None


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
  """A registry entry bound to a concrete location and preparation.

  This is what the pipeline carries to the workers: small, picklable, and
  enough to load the model and label its outputs.

  Attributes:
    spec: the registry entry.
    path: the model's folder (local or a bucket).
    resize: the photo preparation its inputs get.
    labelmap_path: the classifier's labelmap CSV; None for embedders.
    requested_runtime: what ``--runtime`` asked for: ``auto``, ``tf`` or
      ``onnx``.
    decision: the runtime the launcher decided on (a
      ``transforms.runtimes.RuntimeDecision``, attached by
      ``transforms.runtimes.chooser``); None until then.  Workers run the
      runtime it names and refuse a model without one.
    model_root: the ``--model_root`` the folder was found under; None for a
      ``--model_handle``.  Only for messages: which flag to fix.
    retime_runtimes: ``--retime_runtimes``: for ``auto``, time both
      runtimes here even when the ONNX file records its timings.
    label_taxa: a classifier's labels as taxa (a
      ``transforms.taxonomy.LabelTaxa``, attached by the launcher with
      ``--taxa``); None without a taxonomy.
    prior: a classifier's geographic prior (a
      ``transforms.prior.PriorSettings``, attached by the launcher with
      ``--prior``); None without one.
  """

  spec: ModelSpec
  path: str
  resize: str
  labelmap_path: Optional[str] = None
  requested_runtime: str = "auto"
  decision: Optional[Any] = None  # a transforms.runtimes.RuntimeDecision
  model_root: Optional[str] = None
  retime_runtimes: bool = False
  label_taxa: Optional[Any] = None  # a transforms.taxonomy.LabelTaxa
  prior: Optional[Any] = None  # a transforms.prior.PriorSettings

  def __post_init__(self):
    if self.requested_runtime not in RUNTIME_REQUESTS:
      raise ModelError(
          f"--runtime must be one of {', '.join(RUNTIME_REQUESTS)}, not "
          f"{self.requested_runtime!r}")

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def runtime(self) -> Optional[str]:
    """The decided runtime (``tf`` or ``onnx``); None before the decision."""
    return self.decision.runtime if self.decision is not None else None

  @property
  def runtime_note(self) -> str:
    """Why the model runs where it runs; empty before the decision."""
    return self.decision.note if self.decision is not None else ""

  def with_decision(self, decision) -> "ResolvedModel":
    """This model, to run on the runtime ``decision`` names.

    Args:
      decision: a ``transforms.runtimes.RuntimeDecision``.  The runtimes
        import this module, never the reverse, so a decision is recognised
        by the fields it holds.

    Raises:
      TypeError: anything else.
    """
    if not all(hasattr(decision, field)
               for field in ("runtime", "note", "precision")):
      raise TypeError(f"model {self.name}: a decision is a RuntimeDecision, "
                      f"not {type(decision).__name__}")
    return dataclasses.replace(self, decision=decision)

  def require_decision(self):
    """The decision, for code that runs the model.

    Raises:
      ValueError: none was attached.
    """
    if self.decision is None:
      raise ValueError(
          f"model {self.name} has no runtime decision (requested: "
          f"{self.requested_runtime}); pass the models through "
          f"natvision.pipelines.launch.check_models, or attach one with "
          f"natvision.transforms.runtimes.chooser.decided(model), before running them")
    return self.decision

  def describe(self) -> dict:
    """A JSON-friendly summary for run.json and Parquet metadata."""
    return {
        "name": self.spec.name,
        "kind": self.spec.kind,
        "format": self.spec.model_format,
        "path": self.path,
        "output_width": self.spec.output_width,
        "input_size": self.spec.input_size,
        "resize": self.resize,
        "labelmap": self.labelmap_path,
        "taxa_fingerprint": (self.label_taxa.fingerprint
                             if self.label_taxa is not None else None),
        "prior_fingerprint": (self.prior.fingerprint
                              if self.prior is not None else None),
        "licence": self.spec.licence,
        "source": self.spec.source,
        "runtime": self.runtime,
        "runtime_note": self.runtime_note,
        "precision": self.decision.precision if self.decision else None,
        "agreement": (self.decision.agreement.as_dict()
                      if self.decision and self.decision.agreement else None),
    }


def _join(root: str, *parts: str) -> str:
  return FileSystems.join(root.rstrip("/"), *parts)


def absolute_location(location: str) -> str:
  """A model's location as the tables record it: one that travels.

  A local path becomes absolute and resolved (symbolic links followed), so
  that a table written from one folder names a model that ``natvision-search``
  finds from any other; a URI (gs://, s3://, ...) stays as it is.
  """
  if "://" in location:
    return location
  return os.path.realpath(os.path.expanduser(location))


def resolve_models(
    names: Sequence[str],
    model_root: Optional[str],
    handles: Optional[Mapping[str, str]] = None,
    labelmaps: Optional[Mapping[str, str]] = None,
    resize: Optional[str] = None,
    requested_runtime: str = "auto",
) -> List[ResolvedModel]:
  """Binds registry names to locations (absolute, see
  ``absolute_location``); no I/O beyond resolving local links.

  Args:
    names: registry names, in the order the user gave them.
    model_root: folder holding ``<name>/`` copies, or None when every model
      has an explicit handle.
    handles: explicit locations per model name; they win over model_root.
    labelmaps: explicit labelmap files per classifier name.
    resize: a preparation that overrides every model's default.
    requested_runtime: ``--runtime`` (``auto``, ``tf`` or ``onnx``), decided
      later by the launcher.

  Returns:
    One ResolvedModel per name.

  Raises:
    ModelError: unknown name, no location for a model, or an unknown
      runtime.
  """
  handles = {name: absolute_location(path)
             for name, path in (handles or {}).items()}
  labelmaps = {name: absolute_location(path)
               for name, path in (labelmaps or {}).items()}
  if model_root:
    model_root = absolute_location(model_root)
  if resize is not None and resize not in RESIZE_POLICIES:
    raise ModelError(f"--resize must be one of {', '.join(RESIZE_POLICIES)}")
  for mapping, flag in ((handles, "--model_handle"), (labelmaps, "--labelmap")):
    for name in mapping:
      if name not in names:
        raise ModelError(
            f"{flag} names {name!r}, which is not in --models ({','.join(names)})")
  resolved = []
  for name in names:
    spec = get_spec(name)
    path = handles.get(name)
    root = None
    if path is None:
      if not model_root:
        raise ModelError(
            f"model {name}: no location; pass --model_root (a folder holding "
            f"{name}/) or --model_handle {name}=PATH")
      path, root = _join(model_root, name), model_root
    labelmap = None
    if spec.kind == CLASSIFIER:
      labelmap = labelmaps.get(name) or _join(path, spec.labelmap)
    elif name in labelmaps:
      raise ModelError(f"--labelmap names {name}, which is not a classifier")
    resolved.append(
        ResolvedModel(spec=spec, path=path, resize=resize or spec.resize,
                      labelmap_path=labelmap,
                      requested_runtime=requested_runtime, model_root=root))
  return resolved


def _holds_saved_model(path: str) -> bool:
  return (storage.exists(_join(path, "saved_model.pb"))
          or storage.exists(_join(path, "saved_model.pbtxt")))


def check_locations(models: Sequence[ResolvedModel]) -> None:
  """Checks that each model's folder holds a SavedModel; no TensorFlow.

  Existence checks only, run by the launcher before any model is loaded,
  so that a wrong ``--model_root`` or ``--model_handle`` fails in seconds
  (not after TensorFlow has been imported) and the message names the
  folder and the flag to fix, once.

  Raises:
    ModelError: a ``--model_root`` that does not exist or holds none of
      the models, a model missing under it, or a ``--model_handle`` with no
      SavedModel.
    storage.StorageError: storage could not say whether a file exists.
  """
  missing = [m for m in models if not _holds_saved_model(m.path)]
  if not missing:
    return
  for root in dict.fromkeys(m.model_root for m in missing if m.model_root):
    wanted = [m.name for m in models if m.model_root == root]
    absent = [m.name for m in missing if m.model_root == root]
    folders = ", ".join(f"{n}/" for n in wanted)
    if "://" not in root and not os.path.isdir(root):
      raise ModelError(
          f"--model_root {root} does not exist; pass the folder that holds "
          f"one folder per model ({folders})")
    if absent == wanted:
      raise ModelError(
          f"--model_root {root} holds none of the models (no SavedModel in "
          f"{folders} under it); pass the folder that holds them, or "
          f"--model_handle NAME=PATH for each")
  model = missing[0]
  if model.model_root:
    raise ModelError(
        f"model {model.name}: no SavedModel at {model.path} (no "
        f"saved_model.pb); put a copy of the model ({model.spec.source}) "
        f"in {model.name}/ under --model_root {model.model_root}, or pass "
        f"--model_handle {model.name}=PATH")
  raise ModelError(
      f"--model_handle {model.name}={model.path}: no SavedModel there (no "
      f"saved_model.pb); pass the folder of a copy of the model "
      f"({model.spec.source})")


def read_labelmap(path: str, expected: Optional[int] = None) -> List[str]:
  """Reads an ``id,name`` CSV into a list indexed by id.

  Raises:
    ModelError: unreadable file, missing columns, ids that are not
      0..n-1, or a count different from ``expected``.
  """
  try:
    with FileSystems.open(path) as f:
      text = f.read().decode("utf-8-sig")
  except Exception as e:  # noqa: BLE001 - any storage failure is reported
    raise ModelError(f"labelmap {path} cannot be read: {e}") from e
  reader = csv.DictReader(io.StringIO(text))
  if not reader.fieldnames or not {"id", "name"} <= set(reader.fieldnames):
    raise ModelError(
        f"labelmap {path} must be a CSV with columns id,name; found "
        f"{reader.fieldnames}")
  names: Dict[int, str] = {}
  for row in reader:
    try:
      names[int(row["id"])] = row["name"]
    except (TypeError, ValueError):
      raise ModelError(f"labelmap {path}: id {row['id']!r} is not an integer")
  if sorted(names) != list(range(len(names))):
    raise ModelError(f"labelmap {path}: ids must run from 0 to {len(names) - 1}")
  if expected is not None and len(names) != expected:
    raise ModelError(
        f"labelmap {path} has {len(names)} labels; the model has {expected} "
        f"outputs")
  return [names[i] for i in range(len(names))]


_LOCAL_CACHE_ENV = "NATVISION_MODEL_CACHE"


# The rate a model copy's announced duration assumes.
COPY_MB_PER_SECOND = 50


def local_cache_root() -> str:
  """This machine's model cache: ``$NATVISION_MODEL_CACHE``, else
  ``natvision-models`` in the temp dir (remote models' copies, the demo's
  stand-ins)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  return os.environ.get(_LOCAL_CACHE_ENV) or os.path.join(
      tempfile.gettempdir(), "natvision-models")


def stage_locally(path: str) -> str:
  """Returns a local folder holding the model at ``path``.

  Local paths are returned as they are.  Remote folders (gs://, s3://) are
  copied into a cache folder (``$NATVISION_MODEL_CACHE`` or the temp dir)
  so that TensorFlow reads local files.  The cache is keyed by the path and
  by each file's name, size and modification time, so a model replaced at
  the same path is fetched again.

  Raises:
    ModelError: the folder holds no files.
    storage.StorageError: the listing or a copy failed.
  """
  if "://" not in path:
    return path
  import hashlib  # pylint: disable=import-outside-toplevel

  prefix = path.rstrip("/") + "/"
  listing = [(p[len(prefix):], size, mtime) for p, size, mtime in
             storage.match_metadata(prefix + "**")]
  listing = [entry for entry in listing
             if entry[0] and not entry[0].endswith("/")]
  if not listing:
    raise ModelError(f"{path} holds no files")
  cache_root = local_cache_root()
  key = hashlib.sha256(repr((path, listing)).encode()).hexdigest()[:16]
  target = os.path.join(cache_root, key)
  done = os.path.join(target, ".complete")
  if os.path.exists(done):
    return target
  tmp = f"{target}.tmp{os.getpid()}"
  megabytes = sum(size for _, size, _ in listing) / 1e6
  logging.getLogger("natvision").info(
      "copying model %s (%.0f MB) to this machine's cache %s (about %.0f s "
      "at %d MB/s)", path, megabytes, target,
      max(1.0, megabytes / COPY_MB_PER_SECOND), COPY_MB_PER_SECOND)
  for rel, _, _ in listing:
    dest = os.path.join(tmp, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with FileSystems.open(prefix + rel) as src, open(dest, "wb") as out:
      while True:
        chunk = src.read(1 << 22)
        if not chunk:
          break
        out.write(chunk)
  open(os.path.join(tmp, ".complete"), "w").close()
  try:
    os.rename(tmp, target)
  except OSError:
    # Another process of this worker finished first; use its copy.
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(tmp, ignore_errors=True)
  return target


# --------------------------------------------------------------------------
# The model flags every job takes.

DEFAULT_MODELS = ("inaturalist_v2", "fungi_mobile_v1", "inception_resnet_v2")
REQUESTED_RUNTIMES = ("auto", "tf", "onnx")


def add_flags(parser) -> None:
  """Adds --models, --model_root, --model_handle, --labelmap, --resize and
  --runtime to an argparse parser."""
  parser.add_argument(
      "--models", default=",".join(DEFAULT_MODELS),
      help="comma-separated registry names")
  parser.add_argument(
      "--model_root",
      help="folder (local, gs:// or s3://) holding one folder per model")
  parser.add_argument(
      "--model_handle", action="append", default=[], metavar="NAME=PATH",
      help="explicit location of one model (repeatable)")
  parser.add_argument(
      "--labelmap", action="append", default=[], metavar="NAME=PATH",
      help="labelmap CSV (id,name) for a classifier (default: "
      "labelmap.csv in its folder)")
  parser.add_argument(
      "--resize", choices=RESIZE_POLICIES,
      help="override every model's default photo preparation (default: "
      "each model's own)")
  parser.add_argument(
      "--runtime", choices=REQUESTED_RUNTIMES, default="auto",
      help="auto: ONNX Runtime where it passes the check against "
      "TensorFlow and is faster, else TensorFlow; tf; onnx (fail if the "
      "check fails)")
  parser.add_argument(
      "--retime_runtimes", action="store_true",
      help="with --runtime auto, time TensorFlow and ONNX Runtime again on "
      "this machine instead of deciding from the timings recorded in the "
      "ONNX file when it was made (loads TensorFlow)")


def from_args(args, model_root: Optional[str]) -> Tuple["ResolvedModel", ...]:
  """Resolves the models the flags name; no I/O.

  Args:
    args: parsed flags (``add_flags``).
    model_root: the folder holding the models (``--model_root``, or the
      demo's stand-ins).

  Raises:
    ModelError: an empty or repeated --models, an unknown name, or a model
      with no location.
  """
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  if not names:
    raise ModelError("--models is empty; name at least one of "
                     f"{', '.join(REGISTRY)}")
  if len(set(names)) != len(names):
    raise ModelError(f"--models names a model twice: {args.models}")
  resolved = resolve_models(
      names, model_root,
      handles=config.key_values(args.model_handle, "--model_handle"),
      labelmaps=config.key_values(args.labelmap, "--labelmap"),
      resize=args.resize, requested_runtime=args.runtime)
  retime = bool(getattr(args, "retime_runtimes", False))
  return tuple(dataclasses.replace(m, retime_runtimes=retime)
               for m in resolved)
