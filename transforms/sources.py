"""Sources: turn ``--input`` into one ``ImageRef`` per distinct photo.

Input is either glob patterns on any Beam filesystem (local, gs://, s3://) or
one manifest: a CSV, TSV, JSONL or Parquet file (optionally gzip-compressed)
with a ``uri`` column, an optional ``image_id`` column and any other columns,
which are carried into every output row for that photo.

Without an ``image_id`` column the id is derived from the URI (a hash), so it
is stable across runs.  The demo's sample photos, which lie wherever the
package is installed, hash their path relative to the sample folder
instead (``image_id_relative_to``), so their ids are the same everywhere.
Photos listed twice (same id) are processed once, as the row that sorts
first by ``duplicate_order`` (URI, then the carried values as text),
whatever order the rows come in.

The manifest is checked when the pipeline is built, so that bad input fails
before any work starts: a Parquet manifest's footer is read (not its rows); a
text manifest is read once, streaming, so that bytes that are not valid in
its encoding (``--manifest_encoding``, default UTF-8) fail with the line
number, and so that a JSONL manifest's columns are every key of every line,
in order of first appearance.  The rows are read inside the pipeline, so a
manifest of millions of rows never enters the job graph.

File names that are not valid UTF-8 (see ``transforms.uris``) become an
``ImageRef`` whose ``uri`` is readable text and whose ``path`` opens the
file; their id hashes the name's bytes, so it is stable too.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
from typing import (Any, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystem import FileSystem
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import config
from natvision.transforms import sinks
from natvision.transforms import uris
from natvision.transforms.records import ImageRef

URI_COLUMN = "uri"
ID_COLUMN = "image_id"

# Output columns a manifest column may not shadow, in any letter case
# (DuckDB, BigQuery and Spark compare column names without case): every
# column of the tables' schemas.
RESERVED_COLUMNS = frozenset(sinks.output_columns())

DEFAULT_ENCODING = "utf-8"
# Bytes decoded at a time when a text manifest is scanned or read.
_TEXT_CHUNK = 1 << 20

MANIFEST_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


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


def check_encoding(encoding: str) -> str:
  """The codec name of a manifest encoding (``cp1252`` for ``windows-1252``).

  Raises:
    InputError: an encoding Python does not know.
  """
  try:
    return codecs.lookup(encoding).name
  except LookupError:
    raise InputError(
        f"--manifest_encoding {encoding!r} is not a known encoding; use e.g. "
        f"utf-8, cp1252 or latin-1") from None


def _python_codec(encoding: str) -> str:
  name = check_encoding(encoding)
  # A byte-order mark that spreadsheet programs put first is not data.
  return "utf-8-sig" if name == "utf-8" else name


def manifest_format(path: str) -> Optional[str]:
  """Returns csv, tsv, jsonl or parquet for a manifest path, else None."""
  name = path.lower()
  if name.endswith(".gz"):
    name = name[:-3]
  for ext, fmt in MANIFEST_FORMATS.items():
    if name.endswith(ext):
      return fmt
  return None


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A manifest file and the columns it carries into the tables.

  Attributes:
    path: the manifest file.
    fmt: csv, tsv, jsonl or parquet.
    columns: all column names, in file order (JSONL: every key of every
      line, in order of first appearance).
    carried: the carried columns (all but uri and image_id) with their
      Arrow types: the Parquet types for Parquet manifests, strings for the
      text formats.
    row_count: number of rows (counted at launch for the text formats).
    encoding: the text formats' character encoding (``--manifest_encoding``).
  """

  path: str
  fmt: str
  columns: Tuple[str, ...]
  carried: Tuple[Tuple[str, pa.DataType], ...]
  row_count: Optional[int] = None
  encoding: str = DEFAULT_ENCODING

  @property
  def has_id(self) -> bool:
    return ID_COLUMN in self.columns


def _open(path: str):
  """Opens a file on any Beam filesystem, gunzipping ``.gz`` files."""
  raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  if path.lower().endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  return raw


def _csv_options(fmt: str):
  if fmt == "tsv":
    # iNaturalist open data: tab-separated and unquoted.
    parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False)
  else:
    # Spreadsheet programs quote cells that hold line breaks.
    parse = pa_csv.ParseOptions(delimiter=",", newlines_in_values=True)
  return parse


@contextlib.contextmanager
def _parquet(path: str) -> Iterator[pq.ParquetFile]:
  """A ParquetFile that reads the footer first and row groups on demand.

  Beam's file handles are seekable on every filesystem, so only the bytes
  asked for are read; a gzipped Parquet file cannot seek and is read whole.
  """
  with _open(path) as f:
    if path.lower().endswith(".gz"):
      yield pq.ParquetFile(pa.BufferReader(f.read()))
    else:
      yield pq.ParquetFile(f)


def _encoding_message(path: str, encoding: str, line_no: int,
                      error: UnicodeDecodeError) -> str:
  bad = bytes(error.object[error.start:error.end])
  if check_encoding(encoding) == "utf-8":
    hint = ("the file was probably saved in another encoding (spreadsheet "
            "programs often save Windows-1252): pass --manifest_encoding "
            "cp1252 (or latin-1, or the encoding it was saved in), or save "
            "it as UTF-8")
  else:
    hint = (f"check --manifest_encoding {encoding} (the default is "
            f"{DEFAULT_ENCODING})")
  return (f"manifest {path} line {line_no}: bytes {bad!r} are not valid "
          f"{encoding}; {hint}")


def _text_lines(f, path: str, encoding: str) -> Iterator[Tuple[int, str]]:
  """Decodes a binary stream chunk by chunk into (line number, line).

  Lines are split on "\n" only, without it; memory holds one chunk and one
  line.

  Raises:
    InputError: bytes that are not valid in ``encoding``, naming the line.
  """
  codec = _python_codec(encoding)
  decoder = codecs.getincrementaldecoder(codec)("strict")
  line_no = 0
  pending = ""
  final = False
  while not final:
    chunk = f.read(_TEXT_CHUNK)
    final = not chunk
    try:
      text = pending + decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
      before = bytes(e.object[:e.start]).decode(codec, "replace")
      raise InputError(_encoding_message(
          path, encoding, line_no + before.count("\n") + 1, e)) from e
    lines = text.split("\n")
    pending = "" if final else lines.pop()
    for line in lines:
      line_no += 1
      yield line_no, line


def _json_object(line: str, path: str, line_no: int) -> dict:
  try:
    record = json.loads(line)
  except ValueError as e:
    raise InputError(f"manifest {path} line {line_no}: not valid JSON ({e})"
                     ) from e
  if not isinstance(record, dict):
    raise InputError(
        f"manifest {path} line {line_no}: each line must be a JSON object")
  return record


def _scan_jsonl(lines: Iterator[Tuple[int, str]],
                path: str) -> Tuple[List[str], int]:
  """Every key of every line, in order of first appearance; the row count."""
  columns: Dict[str, None] = {}
  rows = 0
  for line_no, line in lines:
    if line.strip():
      for key in _json_object(line, path, line_no):
        columns.setdefault(key)
      rows += 1
  return list(columns), rows


def _ragged(path: str, line_no: int, got: int, header: List[str]) -> InputError:
  return InputError(
      f"manifest {path} line {line_no}: {got} field(s), but the header has "
      f"{len(header)} ({', '.join(header)})")


def _scan_csv(lines: Iterator[Tuple[int, str]],
              path: str) -> Tuple[List[str], int]:
  """The header and row count of a CSV, checking every record's width.

  Parsed as the job parses it (commas, double quotes, quoted values may
  span lines, empty lines skipped).
  """
  import csv  # pylint: disable=import-outside-toplevel
  reader = csv.reader(line + "\n" for _, line in lines)
  try:
    header = next(reader, [])
    rows = 0
    for record in reader:
      if not record:
        continue
      if len(record) != len(header):
        raise _ragged(path, reader.line_num, len(record), header)
      rows += 1
  except csv.Error as e:
    raise InputError(f"manifest {path} line {reader.line_num}: {e}") from e
  return header, rows


def _scan_tsv(lines: Iterator[Tuple[int, str]],
              path: str) -> Tuple[List[str], int]:
  """The header and row count of an unquoted TSV, checking every width."""
  header: Optional[List[str]] = None
  rows = 0
  for line_no, line in lines:
    fields = line.rstrip("\r").split("\t")
    if header is None:
      header = [c.strip() for c in fields]
    elif line.strip("\r"):
      if len(fields) != len(header):
        raise _ragged(path, line_no, len(fields), header)
      rows += 1
  return header or [], rows


def _scan_text(path: str, fmt: str,
               encoding: str) -> Tuple[List[str], int]:
  """Reads a text manifest once, streaming, and checks every line.

  Returns:
    (columns, row count): the header's columns (JSONL: every key, in order
    of first appearance) and the number of rows.

  Raises:
    InputError: a line that does not decode, a CSV or TSV row whose number
      of fields differs from the header's, or a JSONL line that is not a
      JSON object, naming the line.
  """
  scan = {"jsonl": _scan_jsonl, "csv": _scan_csv, "tsv": _scan_tsv}[fmt]
  with _open(path) as f:
    return scan(_text_lines(f, path, encoding), path)


def _column_clashes(columns: Sequence[str]) -> List[str]:
  """Descriptions of the columns whose names clash, ignoring case."""
  reserved = {c.lower(): c for c in RESERVED_COLUMNS}
  clashes = []
  for c in columns:
    if c in (URI_COLUMN, ID_COLUMN):
      continue
    if c.lower() in reserved:
      clashes.append(f"{c} (output column {reserved[c.lower()]})")
  by_case: Dict[str, List[str]] = {}
  for c in columns:
    by_case.setdefault(c.lower(), []).append(c)
  for same in by_case.values():
    if len(same) > 1:
      clashes.append(" and ".join(same))
  return clashes


def read_manifest_header(path: str,
                         encoding: str = DEFAULT_ENCODING) -> Manifest:
  """Reads a manifest's columns and checks them, before the pipeline runs.

  A Parquet manifest's footer is read; a text manifest is read once,
  streaming, to check that every line decodes (and, for JSONL, to learn
  every key).

  Args:
    path: the manifest, on any Beam filesystem.
    encoding: the character encoding of a text manifest.

  Returns:
    The checked Manifest.

  Raises:
    InputError: unreadable file, bytes that are not valid in ``encoding``,
      no ``uri`` column, a carried column whose name equals an output
      column's in any letter case, or two columns that differ only by case.
  """
  fmt = manifest_format(path)
  if fmt is None:
    raise InputError(f"{path} is not a manifest (.csv, .tsv, .jsonl, .parquet)")
  encoding = check_encoding(encoding)
  row_count = None
  try:
    if not FileSystems.exists(path):
      raise InputError(f"manifest {path} does not exist (--input)")
    if fmt == "parquet":
      with _parquet(path) as pf:
        schema = pf.schema_arrow
        row_count = pf.metadata.num_rows
      columns = list(schema.names)
      types = {n: schema.field(n).type for n in columns}
    else:
      columns, row_count = _scan_text(path, fmt, encoding)
      types = {n: pa.string() for n in columns}
  except InputError:
    raise
  except Exception as e:  # noqa: BLE001 - report any read/parse failure
    raise InputError(f"manifest {path} cannot be read as {fmt}: {e}") from e
  if URI_COLUMN not in columns:
    raise InputError(
        f"manifest {path} has no '{URI_COLUMN}' column (columns: "
        f"{', '.join(columns) or 'none'}); add a '{URI_COLUMN}' column with "
        f"each photo's path")
  bad_names = [uris.readable(c) for c in columns if not uris.is_text(c)]
  if bad_names:
    raise InputError(
        f"manifest {path}: column name(s) {', '.join(bad_names)} are not "
        f"valid text; rename them")
  clashes = _column_clashes(columns)
  if clashes:
    raise InputError(
        f"manifest {path}: column(s) {'; '.join(clashes)} clash (query "
        f"engines compare column names without case); rename them")
  carried = tuple(
      (c, types[c]) for c in columns if c not in (URI_COLUMN, ID_COLUMN))
  return Manifest(path=path, fmt=fmt, columns=tuple(columns), carried=carried,
                  row_count=row_count, encoding=encoding)


def iter_manifest_rows(manifest: Manifest) -> Iterator[dict]:
  """Streams a manifest's rows as dicts, without loading it whole.

  Parquet manifests are read one row group at a time.
  """
  if manifest.fmt == "parquet":
    with _parquet(manifest.path) as pf:
      for group in range(pf.num_row_groups):
        for batch in pf.iter_batches(batch_size=10_000,
                                     row_groups=[group]):
          yield from batch.to_pylist()
    return
  if manifest.fmt == "jsonl":
    with _open(manifest.path) as f:
      for line_no, line in _text_lines(f, manifest.path, manifest.encoding):
        if line.strip():
          yield _json_object(line, manifest.path, line_no)
    return
  convert = pa_csv.ConvertOptions(
      column_types={c: pa.string() for c in manifest.columns},
      strings_can_be_null=True)
  codec = check_encoding(manifest.encoding)
  read = pa_csv.ReadOptions(
      block_size=1 << 22, encoding="utf8" if codec == "utf-8" else codec)
  with _open(manifest.path) as f:
    reader = pa_csv.open_csv(
        f, read_options=read, parse_options=_csv_options(manifest.fmt),
        convert_options=convert)
    for batch in reader:
      yield from batch.to_pylist()


def ref_from_row(row: dict, manifest: Manifest) -> ImageRef:
  """Builds the ImageRef of one manifest row.

  A ``uri`` (or ``image_id``) that is a Parquet binary value, or a JSONL
  string with escaped surrogates, may name bytes that are not UTF-8: the
  ref reads those bytes and shows them readably (see ``ref_for_uri``).
  """
  uri = row.get(URI_COLUMN)
  uri = "" if uri is None else _str(uri).strip()
  image_id = row.get(ID_COLUMN) if manifest.has_id else None
  image_id = (uris.readable(_str(image_id))
              if image_id not in (None, "", b"") else None)
  extra = tuple((name, _as_text(row.get(name), dtype))
                for name, dtype in manifest.carried)
  return ref_for_uri(uri, image_id, extra)


def _str(value: Any) -> str:
  """A value as str; bytes keep their undecodable bytes as surrogates."""
  if isinstance(value, bytes):
    return value.decode("utf-8", "surrogateescape")
  return str(value)


def _as_text(value: Any, dtype: pa.DataType) -> Any:
  if not pa.types.is_string(dtype) or value is None:
    return value
  if isinstance(value, (dict, list)):
    return json.dumps(value)
  return uris.readable(_str(value))


class _ReadManifestFn(beam.DoFn):

  def __init__(self, manifest: Manifest):
    self._manifest = manifest

  def process(self, path: str) -> Iterator[ImageRef]:
    del path
    rows = beam.metrics.Metrics.counter("natvision", "manifest_rows")
    for row in iter_manifest_rows(self._manifest):
      rows.inc()
      yield ref_from_row(row, self._manifest)


class _MatchFn(beam.DoFn):
  """A glob pattern (as bytes) -> the ImageRef of every file it matches.

  With ``ids_relative_to`` (a folder), ids hash the path relative to it
  (``image_id_relative_to``); else the whole URI.
  """

  def __init__(self, ids_relative_to: Optional[str] = None):
    self._base = ids_relative_to

  def process(self, pattern: bytes) -> Iterator[ImageRef]:
    text = pattern.decode("utf-8", "surrogateescape")
    for metadata in FileSystems.match([text])[0].metadata_list:
      image_id = (image_id_relative_to(metadata.path, self._base)
                  if self._base else None)
      yield ref_for_uri(metadata.path, image_id)


def _text_or_none_first(value: Any) -> Tuple[bool, str]:
  """Orders values as text, with a missing value (None) before any text."""
  return (False, "") if value is None else (True, _str(value))


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


def _first_of_duplicates(item: Tuple[str, Iterable[ImageRef]]) -> ImageRef:
  """(image_id, refs) -> the first ref by ``duplicate_order``; counts the
  others as ``duplicate_inputs``."""
  _, refs = item
  refs = list(refs)
  if len(refs) > 1:
    beam.metrics.Metrics.counter("natvision", "duplicate_inputs").inc(
        len(refs) - 1)
  return min(refs, key=duplicate_order)


class OnePerId(beam.PTransform):
  """ImageRefs -> one per ``image_id`` (the first by ``duplicate_order``:
  by URI, then carried values), for readers whose input may list a photo
  twice."""

  def expand(self, refs):
    return (refs
            | "KeyById" >> beam.Map(lambda r: (r.image_id, r))
            | "GroupById" >> beam.GroupByKey()
            | "OnePerId" >> beam.Map(_first_of_duplicates))


class ReadImageRefs(beam.PTransform):
  """Emits one ImageRef per distinct photo of the input.

  Args:
    patterns: glob patterns (used when ``manifest`` is None).
    manifest: a checked Manifest, from read_manifest_header.
    ids_relative_to: a folder whose photos get ids that hash their path
      relative to it (the demo's sample photos); None: ids hash the URI.
  """

  def __init__(self, patterns: Sequence[str] = (),
               manifest: Optional[Manifest] = None,
               ids_relative_to: Optional[str] = None):
    super().__init__()
    if not patterns and manifest is None:
      raise ValueError("ReadImageRefs needs patterns or a manifest")
    self._patterns = list(patterns)
    self._manifest = manifest
    self._ids_relative_to = ids_relative_to

  def expand(self, pbegin):
    if self._manifest is not None:
      refs = (pbegin
              | "ManifestPath" >> beam.Create(
                  [uris.readable(self._manifest.path)])
              | "ReadManifest" >> beam.ParDo(_ReadManifestFn(self._manifest)))
    else:
      # Patterns travel as bytes: Beam's str coder refuses a str that
      # names bytes that are not UTF-8.
      refs = (pbegin
              | "Patterns" >> beam.Create(
                  [uris.uri_bytes(p) for p in self._patterns])
              | "MatchFiles" >> beam.ParDo(_MatchFn(self._ids_relative_to)))
    return (refs
            | "KeyById" >> beam.Map(lambda r: (r.image_id, r))
            | "GroupById" >> beam.GroupByKey()
            | "OnePerId" >> beam.Map(_first_of_duplicates))


def sample_uris(manifest: Manifest, limit: int = 1000) -> List[str]:
  """The URIs of a manifest's first ``limit`` rows, to check their schemes
  before the job starts."""
  found = []
  for row in iter_manifest_rows(manifest):
    uri = row.get(URI_COLUMN)
    if uri not in (None, "", b""):
      found.append(_str(uri).strip())
    if len(found) >= limit:
      break
  return found


def check_listable(patterns: Sequence[str]) -> None:
  """Refuses glob patterns on http(s), which cannot be listed.

  Raises:
    InputError: naming the pattern and what to give instead.
  """
  for pattern in patterns:
    if pattern.lower().startswith(("http://", "https://")):
      raise InputError(
          f"--input {pattern}: a web server cannot be listed like a folder; "
          f"list the photos' URLs in a manifest (a .csv with a uri column) "
          f"or give a Darwin Core archive")


# Files counted at launch, at most: the progress lines' total comes from
# this bounded count (transforms/progress.py); past it they show no total.
COUNT_LIMIT = 100_000


@dataclasses.dataclass(frozen=True)
class InputCount:
  """How many distinct files the glob patterns match, as far as counted.

  Attributes:
    files: distinct files counted.
    at_least: True when counting stopped at the bound: there are at least
      ``files`` files, perhaps many more.
  """

  files: int
  at_least: bool = False

  @property
  def expected_total(self) -> Optional[int]:
    """The progress total: the count when it is whole, else None."""
    return None if self.at_least else self.files


def _is_local(pattern: str) -> bool:
  return isinstance(FileSystems.get_filesystem(pattern), LocalFileSystem)


def _iter_local(pattern: str) -> Iterator[str]:
  """The local files ``pattern`` matches, as Beam's local filesystem matches
  them (``FileSystem.translate_pattern``, symlinked folders not entered),
  one at a time.

  Beam lists a local folder whole (``os.walk`` builds each folder's list of
  names) before matching; this walks ``os.scandir`` lazily, so memory holds
  the folders still to visit, never the files.
  """
  if pattern.endswith("/"):
    pattern += "*"
  prefix = re.match(r"^[^[*?]*", pattern).group(0)
  if prefix == pattern:  # no glob character: one path
    if os.path.exists(pattern):
      yield pattern
    return
  match = _matcher(pattern)
  folders = [os.path.dirname(prefix) or "."]
  while folders:
    folder = folders.pop()
    try:
      with os.scandir(folder) as entries:
        for entry in entries:
          if entry.is_dir():
            if not entry.is_symlink():
              folders.append(entry.path)
          elif match(entry.path):
            yield entry.path
    except FileNotFoundError:
      continue  # gone since it was listed, or never there


def _iter_matches(pattern: str, limit: int) -> Iterator[str]:
  """The paths ``pattern`` matches: all of them, one at a time, for a local
  pattern; at most ``limit`` for another filesystem (Beam stops its
  listing there, so memory holds at most ``limit`` entries).

  Raises:
    InputError: a listing that failed, naming the pattern.
  """
  try:
    if _is_local(pattern):
      yield from _iter_local(pattern)
      return
    result = FileSystems.match([pattern], limits=[limit])[0]
  except (OSError, BeamIOError) as e:
    raise InputError(f"--input {pattern} cannot be listed: {e}") from e
  for metadata in result.metadata_list:
    yield metadata.path


def count_pattern_matches(patterns: Sequence[str],
                          limit: int = COUNT_LIMIT) -> InputCount:
  """Counts the distinct files the patterns match, up to ``limit``; fails
  on a pattern matching none.

  A file matched by several patterns (``photos/*.jpg`` and ``photos/a*``)
  counts once, as ``ReadImageRefs`` reads it once: it is counted under the
  first pattern that matches it (each path is tested against the earlier
  patterns), so no set of paths is kept.  The launcher's memory stays the
  same whatever the number of files; its time grows up to ``limit`` files.

  Raises:
    InputError: a pattern that matches nothing, naming it.
  """
  earlier = []
  files = 0
  for pattern in patterns:
    matched = False
    # Of the paths listed, at most ``files`` were counted before.
    for path in _iter_matches(pattern, limit + 1 + files):
      matched = True
      if any(m(path) for m in earlier):
        continue
      files += 1
      if files > limit:
        return InputCount(files=limit, at_least=True)
    if not matched:
      raise InputError(
          f"--input {pattern} matches no files; check the path or quote the "
          f"pattern so the shell does not expand it")
    earlier.append(_matcher(pattern))
  return InputCount(files=files)


def _matcher(pattern: str):
  """Whether a path is one ``pattern`` matches (Beam's pattern syntax)."""
  if pattern.endswith("/"):
    pattern += "*"
  return re.compile(FileSystem.translate_pattern(pattern)).match
