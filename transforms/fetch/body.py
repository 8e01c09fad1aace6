"""What a 200 body is: decided by its bytes, not its Content-Type.

A body that starts like an image (``decode.is_image``) is a photo even when
sent as ``text/plain`` (PHP image proxies, misconfigured buckets); an HTML,
XML, JSON or text body is refused with its page title or first characters,
and a binary non-image is described, never quoted as text.
"""

from __future__ import annotations

import re
from typing import Optional

from natvision.transforms import decode
from natvision.transforms.fetch.errors import FetchError

# Bytes of a body read before deciding what it is (a page title fits).
HEAD_BYTES = 4096

_NOT_AN_IMAGE = re.compile(
    r"^(text/|application/(json|[-.\w]*\+json|xml|[-.\w]*\+xml|xhtml|"
    r"javascript|pdf))", re.I)
# What decode.sniff_format calls a body that is text, not an image.
_TEXT_KINDS = ("HTML", "XML", "JSON", "text")


def _describe_text(label: str, head: bytes) -> str:
  """A text body for the error row: its page title or first characters."""
  text = head.decode("utf-8", "replace")
  title = re.search(r"<title[^>]*>([^<]{1,120})", text, re.I)
  if title:
    return f"{label} page titled {title.group(1).strip()!r}"
  snippet = " ".join(text.split())[:80]
  return f"{label} ({snippet!r})" if snippet else label


def _describe_binary(head: bytes, length: Optional[int]) -> str:
  """A binary body that is no image, described (never quoted as text)."""
  kind = decode.sniff_format(head)
  size = (f"{length:,} bytes" if length is not None
          else f"{len(head):,} bytes or more" if len(head) >= HEAD_BYTES
          else f"{len(head):,} bytes")
  start = " ".join(f"0x{b:02x}" for b in head[:4])
  named = f" ({kind})" if kind else ""
  return f"binary body{named}, {size}, starts {start}"


def check_body(content_type: str, head: bytes, length: Optional[int],
               url: str) -> None:
  """Refuses a 200 body that is not a photo; its bytes decide, not its label.

  Args:
    content_type: the response's media type, lower case, no parameters.
    head: the body's first bytes (up to 4096: enough to sniff a format and
      find a page title).
    length: the body's declared length in bytes, when known.
    url: for the reason.

  Raises:
    FetchError: an HTML, XML, JSON or text body (with its title or first
      characters), or, under a non-image Content-Type, a binary body that
      is not an image (described by size and first bytes).  A body that
      starts like an image passes whatever its Content-Type; so does an
      unrecognised binary body labelled as an image, for the decoder to
      name.
  """
  if decode.is_image(head):
    return
  kind = decode.sniff_format(head)
  labelled = content_type or "no Content-Type"
  if kind in _TEXT_KINDS:
    label = (content_type if _NOT_AN_IMAGE.match(content_type)
             else f"{kind} body labelled {labelled}")
    raise FetchError(f"the server sent {_describe_text(label, head)}, not an "
                     f"image: {url}")
  if _NOT_AN_IMAGE.match(content_type):
    what = _describe_binary(head, length) if head else "an empty body"
    raise FetchError(f"the server sent {content_type}: {what}, not an image: "
                     f"{url}")

