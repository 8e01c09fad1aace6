"""The data files of a Darwin Core archive, read line by line.

Decides how a data file is opened (a local zip's member in place, a folder's
file, a remote archive copied to a temporary folder first: ``open_files``),
how its bytes become lines (strictly decoded in its encoding, ``\\n``,
``\\r\\n`` and ``\\r`` all ending a line whatever ``linesTerminatedBy``
says, a UTF-8 byte order mark dropped: ``read_lines``), which lines are records
and which are counted skips (``read_records``: too few fields for meta.xml's
highest index, another number than the header's, or unparseable by the
``csv`` module: a ``BadLine``), and what the launcher checks before the job
runs (``check_data_files``: the first ``CHECK_BYTES`` of every file, and a
warning where the written line ending differs from the declared one).

Bytes invalid in the encoding raise ``ArchiveEncodingError`` (exit 2),
naming the file, line, byte offset and encoding.  What the archive holds
(meta.xml, the columns, which rows are photos) is transforms/dwca.py's.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import os
import re
import shutil
import tempfile
import zipfile
from typing import (BinaryIO, Callable, Dict, Iterator, List, Optional,
                    Sequence, Tuple, Union)

from apache_beam.io.filesystems import FileSystems

from natvision.transforms import sources

# Bytes decoded at a time when a data file is read.
_CHUNK = 1 << 20

class ArchiveEncodingError(sources.InputError):
  """A data file holds bytes that are not valid in its encoding (exit 2)."""


@dataclasses.dataclass(frozen=True)
class DataFile:
  """How to read the data files of the core or of one extension.

  Attributes:
    locations: the files, relative to the archive root, in meta.xml's order
      (every ``<location>``).
    encoding: the Python codec (meta.xml's ``encoding`` or
      ``--archive_encoding``).
    declared_encoding: the encoding as meta.xml or the flag writes it.
    delimiter: one character (``fieldsTerminatedBy``).
    quote: ``fieldsEnclosedBy``; empty for unquoted files.
    header_lines: ``ignoreHeaderLines``.
    key_index: the column of the core id (``<id>`` of the core,
      ``<coreid>`` of an extension); None when there is none.
    fields: (column index or None, term, default) per ``<field>``.
    declared_ending: ``linesTerminatedBy``; None when nothing declares one.
  """

  locations: Tuple[str, ...]
  encoding: str
  declared_encoding: str
  delimiter: str
  quote: str
  header_lines: int
  key_index: Optional[int]
  fields: Tuple[Tuple[Optional[int], str, Optional[str]], ...]
  declared_ending: Optional[str] = None

  @property
  def terms(self) -> List[str]:
    return [term for _, term, _ in self.fields]

  @property
  def needed(self) -> int:
    """The fewest fields a line may have: the highest index used, plus one."""
    indexes = [i for i, _, _ in self.fields if i is not None]
    if self.key_index is not None:
      indexes.append(self.key_index)
    return max(indexes) + 1 if indexes else 0


def _zip_member(z: zipfile.ZipFile, path: str, name: str) -> str:
  """The member holding ``name``, at its path or by its base name."""
  if name in z.namelist():
    return name
  members = {os.path.basename(m.filename): m.filename
             for m in z.infolist() if not m.is_dir()}
  member = members.get(os.path.basename(name))
  if member is None:
    raise sources.InputError(f"{path} has no {name}")
  return member


@contextlib.contextmanager
def _local(path: str, kind: str, names: Sequence[str]) -> Iterator[str]:
  """A local folder holding ``names`` of a remote archive (copied).

  Yields:
    The folder, removed afterwards.
  """
  tmp = tempfile.mkdtemp(prefix="natvision-dwca-")
  try:
    if kind == "zip":
      local_zip = os.path.join(tmp, "_archive.zip")
      with FileSystems.open(path) as f, open(local_zip, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
      with zipfile.ZipFile(local_zip) as z:
        for name in names:
          _copy(z.open(_zip_member(z, path, name)), tmp, name)
    else:  # a remote folder, or a bare multimedia.txt anywhere
      for name in names:
        _copy(FileSystems.open(path if kind == "multimedia" else
                               FileSystems.join(path.rstrip("/"), name)),
              tmp, name)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _copy(src: BinaryIO, folder: str, name: str) -> None:
  dst = os.path.join(folder, name)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with src, open(dst, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)


Opener = Callable[[str], BinaryIO]


@contextlib.contextmanager
def open_files(path: str, kind: str, names: Sequence[str]) -> Iterator[Opener]:
  """A function that opens a file of the archive by its location, binary.

  A local zip is read in place (its members stream); a remote archive is
  copied to a temporary folder first (``names`` only, of a zip).
  """
  if "://" in path:
    with _local(path, kind, names) as folder:
      yield lambda name: open(os.path.join(folder, name), "rb")
  elif kind == "zip":
    with zipfile.ZipFile(path) as z:
      yield lambda name: z.open(_zip_member(z, path, name))
  elif kind == "multimedia":
    yield lambda name: open(path, "rb")
  else:
    yield lambda name: open(os.path.join(path, name), "rb")


_BREAK = re.compile(r"\r\n|\r|\n")


def _encoding_error(path: str, name: str, data: DataFile, line_no: int,
                    offset: int, error: UnicodeDecodeError
                    ) -> ArchiveEncodingError:
  bad = bytes(error.object[error.start:error.end])
  return ArchiveEncodingError(
      f"{path}: {name} line {line_no} (byte {offset}): bytes {bad!r} are not "
      f"valid {data.declared_encoding}, the encoding it declares; pass "
      f"--archive_encoding with the encoding it was written in (e.g. cp1252 "
      f"or latin-1), or save it as {data.declared_encoding}")


def read_lines(stream: BinaryIO, path: str, name: str,
           data: DataFile, limit: Optional[int] = None) -> Iterator[str]:
  """Decodes a data file strictly into lines, each with its ending.

  ``\\n``, ``\\r\\n`` and ``\\r`` all end a line; the last line may have no
  ending.  A UTF-8 byte order mark is dropped.  Memory holds one chunk.
  With ``limit``, only about the first ``limit`` bytes are read (whole
  chunks; a character or line cut at the end is not an error).

  Raises:
    ArchiveEncodingError: bytes not valid in ``data.encoding``, naming the
      file, the line (from 1) and the byte offset (from 0).
  """
  decoder = codecs.getincrementaldecoder(data.encoding)("strict")
  pending, lines_done, fed, final, first = "", 0, 0, False, True
  while not final:
    if limit is not None and fed >= limit:
      return  # the rest is decoded (strictly) by the workers
    chunk = stream.read(_CHUNK)
    final = not chunk
    try:
      text = pending + decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
      held = len(e.object) - len(chunk)  # bytes kept from the last chunk
      before = pending + bytes(e.object[:e.start]).decode(data.encoding,
                                                          "replace")
      raise _encoding_error(path, name, data,
                            lines_done + len(_BREAK.findall(before)) + 1,
                            fed - held + e.start, e) from e
    fed += len(chunk)
    if first and text:
      first = False
      if data.encoding.startswith("utf"):
        text = text.removeprefix("\ufeff")
    start = 0
    for m in _BREAK.finditer(text):
      if not final and m.end() == len(text) and m.group() == "\r":
        break  # perhaps the first half of a "\r\n" split across chunks
      yield text[start:m.end()]
      start = m.end()
      lines_done += 1
    pending = text[start:]
    if final and pending:
      yield pending


@dataclasses.dataclass(frozen=True)
class BadLine:
  """A data line that was not read: where, and why (a counted skip)."""

  file: str
  line: int
  why: str

  def __str__(self) -> str:
    return f"{self.file}:{self.line}: {self.why}"


def read_records(path: str, name: str, data: DataFile
             ) -> Iterator[Union[Tuple[str, Dict[str, Optional[str]]],
                                 BadLine]]:
  """(core id, {term: value}) per record of one data file, or a BadLine.

  Raises:
    ArchiveEncodingError: see ``read_lines``.
  """
  quoting = dict(quotechar=data.quote, doublequote=True) if data.quote else (
      dict(quoting=csv.QUOTE_NONE))
  with open_files(path, archive_kind(path), [name]) as open_file:
    with open_file(name) as f:
      reader = csv.reader(read_lines(f, path, name, data),
                          delimiter=data.delimiter, **quoting)
      header_width, headers_left = None, data.header_lines
      while True:
        line_no = reader.line_num + 1
        try:
          record = next(reader)
        except StopIteration:
          return
        except csv.Error as e:
          yield BadLine(name, line_no, f"cannot be parsed ({e})")
          continue
        if not record:
          continue  # a line with no characters is not a record
        if headers_left:
          headers_left -= 1
          header_width = header_width or len(record)
          continue
        why = _width_problem(len(record), data, header_width)
        if why:
          yield BadLine(name, line_no, why)
          continue
        values = {}
        for index, term, default in data.fields:
          value = record[index] if index is not None else None
          values[term] = value if value not in (None, "") else default
        key = record[data.key_index] if data.key_index is not None else ""
        yield key, values


def _width_problem(width: int, data: DataFile,
                   header_width: Optional[int]) -> Optional[str]:
  if width < data.needed:
    return (f"{width} field(s), but meta.xml needs {data.needed} (it names "
            f"column {data.needed - 1})")
  if header_width is not None and width != header_width:
    return f"{width} field(s), but the header has {header_width}"
  return None


def archive_kind(path: str) -> str:
  """``zip``, ``multimedia`` (a bare multimedia.txt) or ``folder``."""
  lower = path.rstrip("/").lower()
  return ("zip" if lower.endswith(".zip") else
          "multimedia" if os.path.basename(lower) == "multimedia.txt"
          else "folder")


_ENDING_NAMES = {"\n": "\\n", "\r\n": "\\r\\n", "\r": "\\r"}


# Bytes of each data file the launcher decodes (``check_data_files``);
# the workers decode every byte strictly, so a bad byte further on fails
# the job with the same message.
CHECK_BYTES = 16 << 20


def check_data_files(path: str, kind: str,
                     parts: Sequence[DataFile]) -> List[str]:
  """Decodes the first ``CHECK_BYTES`` of every data file; returns warnings.

  The launcher's time does not grow with the archive past that; a byte
  invalid in the file's encoding further on is found by the workers
  (``read_records``), which fail the job with the same ``ArchiveEncodingError``.

  Returns:
    One warning per file whose first line ends otherwise than meta.xml's
    ``linesTerminatedBy`` says (it is read as written).

  Raises:
    ArchiveEncodingError: bytes not valid in the file's encoding.
    InputError: a data file the archive does not hold.
  """
  warnings = []
  names = [n for part in parts for n in part.locations]
  with open_files(path, kind, names) as open_file:
    for part in parts:
      for name in part.locations:
        ending = None
        with open_file(name) as f:
          for line in read_lines(f, path, name, part, limit=CHECK_BYTES):
            if ending is None:
              found = _BREAK.search(line)
              ending = found.group() if found else ""
        declared = part.declared_ending
        if ending and declared is not None and ending != declared:
          warnings.append(
              f"{name}: meta.xml declares linesTerminatedBy "
              f"\"{_ENDING_NAMES.get(declared, repr(declared))}\" but its "
              f"lines end with \"{_ENDING_NAMES[ending]}\"; read as written")
  return warnings
