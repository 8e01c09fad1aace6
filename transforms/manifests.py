"""Manifests: lists of photo URIs in a CSV, TSV, JSONL or Parquet file.

A manifest (optionally gzip-compressed) has a ``uri`` column, an optional
``image_id`` column and any other columns, which are carried into every
output row for that photo.  This module reads a manifest's columns and
checks them (``read_manifest_header``), streams its rows
(``iter_manifest_rows``) and turns a row into an ``ImageRef``
(``ref_from_row``); ``transforms/sources.py`` reads the rows in the graph.

What the launcher reads does not grow with the manifest:

- a Parquet manifest's footer (columns, types, the exact row count);
- a text manifest's first ``CHECK_ROWS`` rows, streaming, one chunk and one
  line in memory: bytes that are not valid in its encoding
  (``--manifest_encoding``, default UTF-8) fail with the line number, a
  CSV or TSV row whose width differs from the header's or a JSONL line
  that is not an object fail naming the line, and a JSONL manifest's
  columns are every key of those lines, in order of first appearance.  A
  manifest that ends within them is counted exactly (``row_count``);
  otherwise its rows are estimated from the bytes the checked rows took
  (``estimated_rows``, for the log; progress then shows no total).

The workers check every row again with the same messages
(``check_all_rows``, before the rows of a manifest the launcher did not
read whole), so a bad line further on fails the job (nothing is
committed) as it would have failed the launch; a JSONL key that first
appears after the checked rows fails it too, since the tables' columns are
fixed at launch.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import sinks
from natvision.transforms import uris
from natvision.transforms.records import ImageRef
from natvision.transforms.refs import InputError, as_str, ref_for_uri

URI_COLUMN = "uri"
ID_COLUMN = "image_id"

# Output columns a manifest column may not shadow, in any letter case
# (DuckDB, BigQuery and Spark compare column names without case): every
# column of the tables' schemas.
RESERVED_COLUMNS = frozenset(sinks.output_columns())

DEFAULT_ENCODING = "utf-8"
# Bytes decoded at a time when a text manifest is scanned or read.
_TEXT_CHUNK = 1 << 16
# Rows turned into dicts at a time (of an Arrow batch of megabytes).
_ROWS_AT_A_TIME = 1000
# Rows of a text manifest the launcher checks (and counts); the workers
# check the rest.  About a second of launch time at most, whatever the
# manifest's size.
CHECK_ROWS = 10_000
# Parquet bytes read at a time (the stream reads pages, not whole row
# groups).
_PARQUET_BUFFER = 1 << 20

MANIFEST_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


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
    columns: all column names, in file order (JSONL: every key of the
      checked lines, in order of first appearance).
    carried: the carried columns (all but uri and image_id) with their
      Arrow types: the Parquet types for Parquet manifests, strings for the
      text formats.
    row_count: the exact number of rows when known at launch (a Parquet
      footer; a text manifest of at most ``CHECK_ROWS`` rows), else None.
    encoding: the text formats' character encoding (``--manifest_encoding``).
    estimated_rows: for a text manifest longer than ``CHECK_ROWS`` rows, an
      estimate of its rows (file size over the checked rows' bytes); None
      when ``row_count`` is known.
  """

  path: str
  fmt: str
  columns: Tuple[str, ...]
  carried: Tuple[Tuple[str, pa.DataType], ...]
  row_count: Optional[int] = None
  encoding: str = DEFAULT_ENCODING
  estimated_rows: Optional[int] = None

  @property
  def has_id(self) -> bool:
    return ID_COLUMN in self.columns

  @property
  def checked_whole(self) -> bool:
    """Whether the launcher checked every row (else the workers do)."""
    return self.fmt == "parquet" or self.row_count is not None


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
  """A ParquetFile that reads the footer first and pages on demand.

  Beam's file handles are seekable on every filesystem, so only the bytes
  asked for are read, ``_PARQUET_BUFFER`` at a time; a gzipped Parquet
  file cannot seek and is read whole.
  """
  with _open(path) as f:
    if path.lower().endswith(".gz"):
      yield pq.ParquetFile(pa.BufferReader(f.read()))
    else:
      yield pq.ParquetFile(f, buffer_size=_PARQUET_BUFFER)


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


@dataclasses.dataclass
class _Fed:
  """How much of a text manifest ``_text_lines`` has read and handed on.

  Attributes:
    raw_bytes: bytes of the file read (compressed for ``.gz``).
    text_bytes: decoded bytes read.
    chars: characters decoded.
    chars_used: characters of the lines handed on (with their "\\n").
  """

  raw_bytes: int = 0
  text_bytes: int = 0
  chars: int = 0
  chars_used: int = 0

  def bytes_used(self) -> float:
    """Bytes of the file the lines handed on took (an estimate)."""
    if not self.chars:
      return 0.0
    return (self.chars_used * self.text_bytes / self.chars
            * self.raw_bytes / max(self.text_bytes, 1))


def _text_lines(f, path: str, encoding: str, fed: Optional[_Fed] = None
                ) -> Iterator[Tuple[int, str]]:
  """Decodes a binary stream chunk by chunk into (line number, line).

  Lines are split on "\n" only, without it; memory holds one chunk and one
  line.  ``fed``, when given, is kept up to date.

  Raises:
    InputError: bytes that are not valid in ``encoding``, naming the line.
  """
  codec = _python_codec(encoding)
  decoder = codecs.getincrementaldecoder(codec)("strict")
  raw = getattr(f, "fileobj", None)  # a GzipFile's compressed stream
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
    if fed is not None:
      fed.text_bytes += len(chunk)
      fed.chars += len(text) - len(pending)
      fed.raw_bytes = raw.tell() if raw is not None else fed.text_bytes
    lines = text.split("\n")
    pending = "" if final else lines.pop()
    for line in lines:
      line_no += 1
      if fed is not None:
        fed.chars_used += len(line) + 1
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


# A scan: (lines, path, most rows) -> (columns, rows, whether it ended
# before ``most``; more rows follow when False).
def _scan_jsonl(lines: Iterator[Tuple[int, str]], path: str,
                most: Optional[int]) -> Tuple[List[str], int, bool]:
  """Every key of every line, in order of first appearance; the row count."""
  columns: Dict[str, None] = {}
  rows = 0
  for line_no, line in lines:
    if line.strip():
      if most is not None and rows >= most:
        return list(columns), rows, False
      for key in _json_object(line, path, line_no):
        columns.setdefault(key)
      rows += 1
  return list(columns), rows, True


def _ragged(path: str, line_no: int, got: int, header: List[str]) -> InputError:
  return InputError(
      f"manifest {path} line {line_no}: {got} field(s), but the header has "
      f"{len(header)} ({', '.join(header)})")


def _scan_csv(lines: Iterator[Tuple[int, str]], path: str,
              most: Optional[int]) -> Tuple[List[str], int, bool]:
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
      if most is not None and rows >= most:
        return header, rows, False
      if len(record) != len(header):
        raise _ragged(path, reader.line_num, len(record), header)
      rows += 1
  except csv.Error as e:
    raise InputError(f"manifest {path} line {reader.line_num}: {e}") from e
  return header, rows, True


def _scan_tsv(lines: Iterator[Tuple[int, str]], path: str,
              most: Optional[int]) -> Tuple[List[str], int, bool]:
  """The header and row count of an unquoted TSV, checking every width."""
  header: Optional[List[str]] = None
  rows = 0
  for line_no, line in lines:
    fields = line.rstrip("\r").split("\t")
    if header is None:
      header = [c.strip() for c in fields]
    elif line.strip("\r"):
      if most is not None and rows >= most:
        return header, rows, False
      if len(fields) != len(header):
        raise _ragged(path, line_no, len(fields), header)
      rows += 1
  return header or [], rows, True


_SCANS = {"jsonl": _scan_jsonl, "csv": _scan_csv, "tsv": _scan_tsv}


def _file_size(path: str) -> Optional[int]:
  try:
    found = FileSystems.match([path])[0].metadata_list
  except Exception:  # noqa: BLE001 - an estimate only
    return None
  return found[0].size_in_bytes if found else None


def _scan_text(path: str, fmt: str, encoding: str, most: Optional[int]
               ) -> Tuple[List[str], Optional[int], Optional[int]]:
  """Reads a text manifest's first ``most`` rows, streaming, checking each.

  Returns:
    (columns, exact row count or None, estimated rows or None): the
    header's columns (JSONL: every key of the rows read, in order of first
    appearance); the count when the file ended within ``most`` rows, else
    an estimate from the bytes those rows took and the file's size.

  Raises:
    InputError: a line that does not decode, a CSV or TSV row whose number
      of fields differs from the header's, or a JSONL line that is not a
      JSON object, naming the line.
  """
  fed = _Fed()
  with _open(path) as f:
    columns, rows, ended = _SCANS[fmt](
        _text_lines(f, path, encoding, fed), path, most)
  if ended:
    return columns, rows, None
  size, used = _file_size(path), fed.bytes_used()
  estimate = round(rows * size / used) if size and used else None
  return columns, None, estimate


def check_all_rows(manifest: Manifest) -> None:
  """Checks every row of a text manifest as the launcher checks its first
  ``CHECK_ROWS`` (same messages); a JSONL key not among the manifest's
  columns fails too.  For the workers.

  Raises:
    InputError: see ``read_manifest_header``; or a JSONL key first seen
      after the rows the launcher checked.
  """
  if manifest.fmt == "parquet":
    return
  columns, _, _ = _scan_text(manifest.path, manifest.fmt, manifest.encoding,
                             most=None)
  if manifest.fmt == "jsonl":
    new = [c for c in columns if c not in manifest.columns]
    if new:
      raise InputError(
          f"manifest {manifest.path}: key(s) {', '.join(new)} first appear "
          f"after the first {CHECK_ROWS} lines, whose keys fixed the tables' "
          f"columns when the job started; give every key in the first line "
          f"(null where a row has no value)")


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

  A Parquet manifest's footer is read; of a text manifest, the first
  ``CHECK_ROWS`` rows, streaming (see the module's docstring).

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
  row_count = estimate = None
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
      columns, row_count, estimate = _scan_text(path, fmt, encoding,
                                                CHECK_ROWS)
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
                  row_count=row_count, encoding=encoding,
                  estimated_rows=estimate)


def iter_manifest_rows(manifest: Manifest,
                       columns: Optional[Sequence[str]] = None
                       ) -> Iterator[dict]:
  """Streams a manifest's rows as dicts, without loading it whole.

  Parquet manifests are read one row group at a time, text ones a block
  at a time.

  Args:
    manifest: the checked manifest.
    columns: only these columns of each row (all when None); a Parquet
      manifest then reads no other column's bytes.
  """
  if manifest.fmt == "parquet":
    with _parquet(manifest.path) as pf:
      for group in range(pf.num_row_groups):  # one row group at a time
        for batch in pf.iter_batches(
            batch_size=10_000, row_groups=[group],
            columns=list(columns) if columns else None):
          yield from _rows_of(batch)
    return
  if manifest.fmt == "jsonl":
    with _open(manifest.path) as f:
      for line_no, line in _text_lines(f, manifest.path, manifest.encoding):
        if line.strip():
          yield _json_object(line, manifest.path, line_no)
    return
  wanted = list(columns) if columns else list(manifest.columns)
  convert = pa_csv.ConvertOptions(
      column_types={c: pa.string() for c in manifest.columns},
      include_columns=wanted, strings_can_be_null=True)
  codec = check_encoding(manifest.encoding)
  read = pa_csv.ReadOptions(
      block_size=1 << 22, encoding="utf8" if codec == "utf-8" else codec)
  with _open(manifest.path) as f:
    reader = pa_csv.open_csv(
        f, read_options=read, parse_options=_csv_options(manifest.fmt),
        convert_options=convert)
    for batch in reader:
      yield from _rows_of(batch)


def _rows_of(batch: pa.RecordBatch) -> Iterator[dict]:
  """A batch's rows as dicts, ``_ROWS_AT_A_TIME`` made at a time, so that a
  reader that stops early has not made them all."""
  for start in range(0, batch.num_rows, _ROWS_AT_A_TIME):
    yield from batch.slice(start, _ROWS_AT_A_TIME).to_pylist()


def ref_from_row(row: dict, manifest: Manifest) -> ImageRef:
  """Builds the ImageRef of one manifest row.

  A ``uri`` (or ``image_id``) that is a Parquet binary value, or a JSONL
  string with escaped surrogates, may name bytes that are not UTF-8: the
  ref reads those bytes and shows them readably (see ``ref_for_uri``).
  """
  uri = row.get(URI_COLUMN)
  uri = "" if uri is None else as_str(uri).strip()
  image_id = row.get(ID_COLUMN) if manifest.has_id else None
  image_id = (uris.readable(as_str(image_id))
              if image_id not in (None, "", b"") else None)
  extra = tuple((name, _as_text(row.get(name), dtype))
                for name, dtype in manifest.carried)
  return ref_for_uri(uri, image_id, extra)


def _as_text(value: Any, dtype: pa.DataType) -> Any:
  if not pa.types.is_string(dtype) or value is None:
    return value
  if isinstance(value, (dict, list)):
    return json.dumps(value)
  return uris.readable(as_str(value))


def _table_rows(manifest: Manifest) -> Iterator[dict]:
  """A CSV's or TSV's rows as {column: text}, parsed as the launcher's check
  parses them, one chunk in memory (Arrow's CSV reader reads tens of
  megabytes ahead, so it is for the workers only)."""
  import csv  # pylint: disable=import-outside-toplevel
  with _open(manifest.path) as f:
    lines = _text_lines(f, manifest.path, manifest.encoding)
    if manifest.fmt == "csv":
      records = (r for r in csv.reader(line + "\n" for _, line in lines) if r)
    else:
      records = (line.rstrip("\r").split("\t") for _, line in lines
                 if line.strip("\r"))
    header = [c.strip() for c in next(records, [])]
    for record in records:
      yield dict(zip(header, record))


def sample_uris(manifest: Manifest, limit: int = 1000) -> List[str]:
  """The URIs of a manifest's first ``limit`` rows, to check their schemes
  before the job starts (only the ``uri`` column is read)."""
  found = []
  rows = (iter_manifest_rows(manifest, columns=[URI_COLUMN])
          if manifest.fmt in ("parquet", "jsonl") else _table_rows(manifest))
  for row in rows:
    uri = row.get(URI_COLUMN)
    if uri not in (None, "", b""):
      found.append(as_str(uri).strip())
    if len(found) >= limit:
      break
  return found
