"""A query photo embedded exactly as an embeddings table's run spec says.

Decides how ``natvision-search --photo`` makes its vector: read, decoded
and prepared by ``transforms.photos`` with the run's colour handling, size
limits and the model's preparation, and run by ``transforms.inference`` on
the recorded runtime and precision (TensorFlow, ONNX Runtime in fp32, or
the job's own int8 file); the model is found where the spec says, or under
``--model_root`` / ``--model_handle``, and must have the recorded
fingerprint.  A table without a spec (``transforms.spec.RunSpec`` in each
file's metadata) is not searched by photo.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np

from natvision.transforms import models as models_lib
from natvision.transforms import sinks
from natvision.transforms import spec as spec_lib
from natvision.tools import tables as tables_lib
from natvision.tools.index import SearchError

def table_spec(table: tables_lib.ModelTable) -> spec_lib.RunSpec:
  """The run spec the table's first file records.

  Raises:
    SearchError: the table records no spec (an older natvision wrote it)
      or one that cannot be read.
  """
  try:
    run = sinks.recorded_spec(table.schema())
  except spec_lib.SpecError as e:
    raise SearchError(f"the {table.name} table's run spec in "
                      f"{table.files[0].path} cannot be read: {e}") from e
  if run is None:
    raise SearchError(
        f"the {table.name} table ({table.files[0].path}) records no run spec "
        f"(an older natvision wrote it), so how its rows were made is not "
        f"known; run natvision-embed again to search it by photo")
  return run


def embed_photo(uri: str, table: tables_lib.ModelTable,
                model_root: Optional[str] = None,
                handles: Optional[Dict[str, str]] = None,
                runtime: Optional[str] = None) -> np.ndarray:
  """Embeds one photo exactly as the table's recorded run spec says.

  The photo is read, decoded (with the run's colour-profile handling and
  size limits) and prepared (the model's policy and input size) by
  ``transforms.photos.read_decode_prepare``, and run by
  ``transforms.inference.load_shared`` on the recorded runtime and
  precision: TensorFlow, ONNX Runtime in fp32 (found by the model files'
  fingerprint, checked against TensorFlow as a job's launcher checks it),
  or the very int8 file the job ran (its precision and fingerprint checked).
  The model's files, where they are read (fp32), must have the recorded
  fingerprint.  The result equals the photo's row in the table within the
  spec's ``tolerance`` (``runtimes.output_difference``).

  Args:
    uri: the photo's path or URI.
    table: the embeddings table.
    model_root, handles: where to find the model instead of the recorded
      location (``--model_root``, ``--model_handle``).
    runtime: ``tf`` or ``onnx`` in fp32 instead of the recorded runtime
      and precision (the result is then the fp32 model's, not the table's).

  Returns:
    float32 ``[width]``, the model's raw output.

  Raises:
    SearchError: the table records no spec; the photo cannot be read,
      decoded or prepared; the model cannot be found, loaded or is not the
      one that made the table; the recorded int8 file cannot be found or
      is not that file (the message names it).
  """
  # pylint: disable=import-outside-toplevel
  from natvision.transforms import decode as decode_lib
  from natvision.transforms import inference
  from natvision.transforms import photos
  from natvision.transforms import runtimes
  from natvision.transforms.records import ErrorRecord, ImageRef
  from natvision.transforms.runtimes import base
  from natvision.transforms.runtimes import chooser
  # pylint: enable=import-outside-toplevel
  run = table_spec(table)
  decided = run.model(table.name)
  handles = dict(handles or {})
  if table.name not in handles and not model_root:
    handles[table.name] = decided.location
  # An explicit runtime runs fp32; otherwise the recorded runtime and
  # precision.
  int8 = runtime is None and decided.precision == runtimes.INT8
  runtime = runtime or decided.runtime
  try:
    resolved = models_lib.resolve_models(
        [table.name], model_root, handles=handles, resize=decided.resize,
        requested_runtime=runtime)[0]
  except models_lib.ModelError as e:
    raise SearchError(str(e)) from e
  if resolved.spec.input_size != decided.input_size:
    raise SearchError(
        f"the {table.name} table was made at input size {decided.input_size}, "
        f"the registry's {table.name} takes {resolved.spec.input_size}")
  config = photos.PhotoConfig(
      policies=(decided.resize,), size=decided.input_size,
      color_profile=run.color_profile, max_file_bytes=run.max_file_bytes,
      max_pixels=run.max_pixels)
  min_side = decode_lib.decoded_size_needed(config.policies, config.size)
  prepared, _ = photos.read_decode_prepare(
      ImageRef(image_id="query", uri=uri), config, min_side)
  if isinstance(prepared, ErrorRecord):
    raise SearchError(f"--photo {uri}: {prepared.stage} failed: "
                      f"{prepared.error}")
  try:
    if int8:
      # The int8 file the job ran: OnnxRuntime opens it and refuses it
      # unless it records int8 and the table's fingerprint.
      resolved = resolved.with_decision(runtimes.RuntimeDecision(
          runtimes.RUNTIME_ONNX, note="int8, as the table's spec records",
          precision=runtimes.INT8, onnx_path=decided.int8_file,
          onnx_source="recorded", fingerprint=decided.fingerprint))
    else:
      found = base.model_fingerprint(models_lib.stage_locally(resolved.path))
      if found != decided.fingerprint:
        raise SearchError(
            f"the model files at {resolved.path} (fingerprint {found}) are "
            f"not those that made the {table.name} table (fingerprint "
            f"{decided.fingerprint}); pass --model_root or --model_handle "
            f"{table.name}=PATH naming them")
      if runtime == runtimes.RUNTIME_TF:
        resolved = resolved.with_decision(runtimes.RuntimeDecision(
            runtimes.RUNTIME_TF, note="TensorFlow, as the table's spec "
            "records", fingerprint=found))
      else:
        # The table decided the runtime: the job's "model X runs on ...
        # (--runtime ...)" line would name a flag nobody gave; warnings
        # (a fall-back to TensorFlow) still show.
        natvision_log = logging.getLogger("natvision")
        level = natvision_log.level
        natvision_log.setLevel(max(level, logging.WARNING))
        try:
          resolved = chooser.decided(resolved, timing_runs=0)
        finally:
          natvision_log.setLevel(level)
    model = inference.load_shared(resolved).model
  except models_lib.ModelError as e:
    if int8:
      raise SearchError(
          f"the {table.name} table was made in int8 by {decided.int8_file}, "
          f"which cannot be used here: {e}") from e
    raise SearchError(f"{e} (pass --model_root or --model_handle "
                      f"{table.name}=PATH)") from e
  return model.predict(prepared.arrays[decided.resize][None])[0]
