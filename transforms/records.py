"""Typed records that flow between the pipeline stages.

Each stage takes one small record and hands on another; heavy arrays stay
uint8 until a batch is built for a model.  Failures travel as ``ErrorRecord``
on a tagged output so that every input is accounted for exactly once per
model, in a table or in the errors table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Tuple

import numpy as np

# Tag of the side output that carries ErrorRecord values.
ERRORS_TAG = "errors"

# Stage names used in the errors table.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_PREPARE = "prepare"
STAGE_INFERENCE = "inference"


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """One input photo: where it lives, its stable id and carried columns.

  ``extra`` holds manifest columns (name, value) in manifest order; they are
  copied into every output row for this photo.  ``models`` routes the photo
  to some of the job's models only (None: all of them).

  ``uri`` is always valid text (it goes into the tables).  A file name that
  is not valid UTF-8 comes from the OS with surrogate escapes; then ``uri``
  is its readable form (``transforms.uris.readable``) and ``path`` the str
  that opens the file.  Read from ``location``.
  """

  image_id: str
  uri: str
  extra: Tuple[Tuple[str, Any], ...] = ()
  models: Optional[Tuple[str, ...]] = None
  path: Optional[str] = None

  @property
  def location(self) -> str:
    """What to open to read the photo's bytes."""
    return self.uri if self.path is None else self.path

  def routed_to(self, model: str) -> bool:
    return self.models is None or model in self.models

  def extra_dict(self) -> dict:
    return dict(self.extra)


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """A decoded photo prepared for the models: one uint8 array per policy.

  ``arrays`` maps a preparation name (for example ``center_crop``) to a
  ``[size, size, 3]`` uint8 array.  Several models that share a preparation
  share the array; the photo was decoded once.

  Sizes are upright (after the EXIF orientation): ``source_*`` is the size
  stored in the file, ``decoded_*`` the size it was decoded at (smaller
  when a big JPEG was decoded at 1/2, 1/4 or 1/8 scale).
  """

  ref: ImageRef
  arrays: Mapping[str, np.ndarray]
  source_width: int
  source_height: int
  decoded_width: int
  decoded_height: int


@dataclasses.dataclass(frozen=True)
class EmbeddingResult:
  """One photo's embedding by one model, with its sizes (see PreparedImage)."""

  ref: ImageRef
  model: str
  embedding: np.ndarray  # float32 [width]
  source_width: int
  source_height: int
  decoded_width: int
  decoded_height: int


class RollUpResult(NamedTuple):
  """A photo's answer at the deepest taxon its labels' summed probability
  reaches the roll-up threshold at (transforms/taxonomy.py)."""

  taxon_id: int
  name: str
  rank: str
  score: float


@dataclasses.dataclass(frozen=True)
class PredictionResult:
  """One photo's top-k classes by one model, with its sizes.

  With ``--taxa``, ``taxon_ids`` holds the top-k labels' taxa (None for an
  unmatched label) and ``rollup`` the photo's roll-up (None when no taxon
  reaches the threshold); both are None without a taxonomy.
  """

  ref: ImageRef
  model: str
  label_ids: np.ndarray  # int32 [k], best first
  scores: np.ndarray  # float32 [k], descending
  labels: Tuple[str, ...]
  source_width: int
  source_height: int
  decoded_width: int
  decoded_height: int
  taxon_ids: Optional[Tuple[Optional[int], ...]] = None
  rollup: Optional[RollUpResult] = None


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
  """Why one photo produced no row (for one model, or for all of them)."""

  ref: ImageRef
  stage: str
  error: str
  model: Optional[str] = None
