"""Photo identity: the ``ImageRef`` of a URI, stable ids, and which of two
refs with one id is kept.

Every reader (globs and manifests in ``transforms/sources.py``, Darwin Core
archives in ``transforms/dwca.py``) names a photo through ``ref_for_uri``.
Without an id of its own a photo's id hashes its URI, so it is stable
across runs; the demo's sample photos, which lie wherever the package is
installed, hash their path relative to the sample folder instead
(``image_id_relative_to``).  File names that are not valid UTF-8 (see
``transforms.uris``) become a ref whose ``uri`` is readable text and whose
``path`` opens the file; their id hashes the name's bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Tuple

from natvision.transforms import config
from natvision.transforms import uris
from natvision.transforms.records import ImageRef


class InputError(config.ConfigError):
  """The --input value cannot be used; the message says what to change."""


def image_id_for_uri(uri: str) -> str:
  """A stable id for a photo known only by its URI.

  Args:
    uri: the URI or file name, possibly holding surrogate escapes of bytes
      that are not UTF-8 (they are hashed as those bytes).

  Returns:
    20 hex digits of the SHA-256 of the URI's bytes.
  """
  return hashlib.sha256(uris.uri_bytes(uri)).hexdigest()[:20]


def image_id_relative_to(uri: str, folder: str) -> str:
  """A photo's id that does not depend on where ``folder`` lies.

  For photos shipped with the package (the demo's sample photos): the id
  hashes the path relative to ``folder`` (``flower.jpg``), so the same
  photo has the same id on every machine and in every virtualenv.  A URI
  outside ``folder`` keeps the id of ``image_id_for_uri``.
  """
  prefix = folder.rstrip("/") + "/"
  if uri.startswith(prefix):
    return image_id_for_uri(uri[len(prefix):])
  return image_id_for_uri(uri)


def ref_for_uri(uri: str, image_id: Optional[str] = None,
                extra: Tuple[Tuple[str, Any], ...] = ()) -> ImageRef:
  """The ImageRef of a photo at ``uri``, whatever bytes its name holds.

  Args:
    uri: where the photo lives; a str with surrogate escapes for a file name
      that is not valid UTF-8.
    image_id: the photo's id; derived from the URI when None or empty.
    extra: carried columns.

  Returns:
    An ImageRef whose ``uri`` is valid text and whose ``location`` opens
    the photo.
  """
  shown = uris.readable(uri)
  return ImageRef(image_id=image_id or image_id_for_uri(uri), uri=shown,
                  extra=extra, path=None if shown == uri else uri)


def as_str(value: Any) -> str:
  """A value as str; bytes keep their undecodable bytes as surrogates."""
  if isinstance(value, bytes):
    return value.decode("utf-8", "surrogateescape")
  return str(value)


def _text_or_none_first(value: Any) -> Tuple[bool, str]:
  """Orders values as text, with a missing value (None) before any text."""
  return (False, "") if value is None else (True, as_str(value))


def duplicate_order(ref: ImageRef) -> tuple:
  """The sort key that picks one ref among those sharing an ``image_id``.

  In order: the ``uri``; then the carried values, in column order, compared
  as text (``str``; bytes with their undecodable bytes kept) with a missing
  value (None) first; then the ``path`` that opens the file (None first);
  then the models (None, all of them, first).  Every part is a value of the
  ref, never its position in the input, so the choice is the same whatever
  order the duplicates arrive in.
  """
  return (ref.uri,
          tuple((name, _text_or_none_first(value))
                for name, value in ref.extra),
          _text_or_none_first(ref.path),
          (ref.models is not None, ref.models or ()))
