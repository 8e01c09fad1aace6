"""Sources: turn ``--input`` into one ``ImageRef`` per distinct photo.

Input is either glob patterns on any Beam filesystem (local, gs://, s3://) or
one manifest: a CSV, TSV, JSONL or Parquet file (optionally gzip-compressed)
with a ``uri`` column, an optional ``image_id`` column and any other columns,
which are carried into every output row for that photo.

Without an ``image_id`` column the id is derived from the URI (a hash), so it
is stable across runs.  Photos listed twice (same id) are processed once.

The manifest's header is read when the pipeline is built, so that a missing
``uri`` column fails before any work starts; its rows are read inside the
pipeline, so a manifest of millions of rows never enters the job graph.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.records import ImageRef

URI_COLUMN = "uri"
ID_COLUMN = "image_id"

# Output columns a manifest column may not shadow.
RESERVED_COLUMNS = frozenset({
    "image_id", "uri", "model", "embedding", "label_id", "label", "score",
    "top_k_label_ids", "top_k_labels", "top_k_scores", "stage", "error",
})

MANIFEST_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


class InputError(ValueError):
  """The --input value cannot be used; the message says what to change."""


def image_id_for_uri(uri: str) -> str:
  """A stable id for a photo known only by its URI."""
  return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


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
    columns: all column names, in file order.
    carried: the carried columns (all but uri and image_id) with their
      Arrow types: the Parquet types for Parquet manifests, strings for the
      text formats.
    row_count: number of rows when cheap to know (Parquet), else None.
  """

  path: str
  fmt: str
  columns: Tuple[str, ...]
  carried: Tuple[Tuple[str, pa.DataType], ...]
  row_count: Optional[int] = None

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
    parse = pa_csv.ParseOptions(delimiter=",")
  return parse


def _text_header(path: str, fmt: str) -> List[str]:
  with _open(path) as f:
    if fmt == "jsonl":
      for line in io.TextIOWrapper(f, encoding="utf-8"):
        if line.strip():
          record = json.loads(line)
          if not isinstance(record, dict):
            raise InputError(
                f"manifest {path}: each line must be a JSON object")
          return list(record)
      return []
    first = io.TextIOWrapper(f, encoding="utf-8-sig").readline()
  sep = "\t" if fmt == "tsv" else ","
  if fmt == "csv":
    import csv  # pylint: disable=import-outside-toplevel
    return next(csv.reader([first]), [])
  return [c.strip() for c in first.rstrip("\r\n").split(sep)]


def read_manifest_header(path: str) -> Manifest:
  """Reads a manifest's columns (not its rows) and checks them.

  Raises:
    InputError: unreadable file, no ``uri`` column, or a carried column
      that clashes with an output column.
  """
  fmt = manifest_format(path)
  if fmt is None:
    raise InputError(f"{path} is not a manifest (.csv, .tsv, .jsonl, .parquet)")
  row_count = None
  try:
    if not FileSystems.exists(path):
      raise InputError(f"manifest {path} does not exist (--input)")
    if fmt == "parquet":
      with _open(path) as f:
        pf = pq.ParquetFile(pa.BufferReader(f.read()))
      schema = pf.schema_arrow
      columns = list(schema.names)
      types = {n: schema.field(n).type for n in columns}
      row_count = pf.metadata.num_rows
    else:
      columns = _text_header(path, fmt)
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
  clashes = [c for c in columns if c in RESERVED_COLUMNS - {URI_COLUMN, ID_COLUMN}]
  if clashes:
    raise InputError(
        f"manifest {path}: column(s) {', '.join(clashes)} clash with output "
        f"columns; rename them")
  carried = tuple(
      (c, types[c]) for c in columns if c not in (URI_COLUMN, ID_COLUMN))
  return Manifest(path=path, fmt=fmt, columns=tuple(columns), carried=carried,
                  row_count=row_count)


def iter_manifest_rows(manifest: Manifest) -> Iterator[dict]:
  """Streams a manifest's rows as dicts, without loading it whole."""
  if manifest.fmt == "parquet":
    with _open(manifest.path) as f:
      pf = pq.ParquetFile(pa.BufferReader(f.read()))
      for batch in pf.iter_batches(batch_size=10_000):
        yield from batch.to_pylist()
    return
  if manifest.fmt == "jsonl":
    with _open(manifest.path) as f:
      for line_no, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
        if line.strip():
          record = json.loads(line)
          if not isinstance(record, dict):
            raise InputError(
                f"manifest {manifest.path} line {line_no}: not a JSON object")
          yield record
    return
  convert = pa_csv.ConvertOptions(
      column_types={c: pa.string() for c in manifest.columns},
      strings_can_be_null=True)
  read = pa_csv.ReadOptions(block_size=1 << 22)
  with _open(manifest.path) as f:
    reader = pa_csv.open_csv(
        f, read_options=read, parse_options=_csv_options(manifest.fmt),
        convert_options=convert)
    for batch in reader:
      yield from batch.to_pylist()


def ref_from_row(row: dict, manifest: Manifest) -> ImageRef:
  """Builds the ImageRef of one manifest row."""
  uri = row.get(URI_COLUMN)
  uri = "" if uri is None else str(uri).strip()
  image_id = row.get(ID_COLUMN) if manifest.has_id else None
  image_id = str(image_id) if image_id not in (None, "") else (
      image_id_for_uri(uri))
  extra = tuple((name, _as_text(row.get(name), dtype))
                for name, dtype in manifest.carried)
  return ImageRef(image_id=image_id, uri=uri, extra=extra)


def _as_text(value: Any, dtype: pa.DataType) -> Any:
  if pa.types.is_string(dtype) and value is not None and not isinstance(
      value, str):
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
  return value


class _ReadManifestFn(beam.DoFn):

  def __init__(self, manifest: Manifest):
    self._manifest = manifest

  def process(self, path: str) -> Iterator[ImageRef]:
    del path
    rows = beam.metrics.Metrics.counter("natvision", "manifest_rows")
    for row in iter_manifest_rows(self._manifest):
      rows.inc()
      yield ref_from_row(row, self._manifest)


def _first_of_duplicates(item: Tuple[str, Iterable[ImageRef]]) -> ImageRef:
  _, refs = item
  refs = list(refs)
  if len(refs) > 1:
    beam.metrics.Metrics.counter("natvision", "duplicate_inputs").inc(
        len(refs) - 1)
  return min(refs, key=lambda r: (r.uri, r.extra.__repr__()))


class ReadImageRefs(beam.PTransform):
  """Emits one ImageRef per distinct photo of the input.

  Args:
    patterns: glob patterns (used when ``manifest`` is None).
    manifest: a checked Manifest, from read_manifest_header.
  """

  def __init__(self, patterns: Sequence[str] = (),
               manifest: Optional[Manifest] = None):
    super().__init__()
    if not patterns and manifest is None:
      raise ValueError("ReadImageRefs needs patterns or a manifest")
    self._patterns = list(patterns)
    self._manifest = manifest

  def expand(self, pbegin):
    if self._manifest is not None:
      refs = (pbegin
              | "ManifestPath" >> beam.Create([self._manifest.path])
              | "ReadManifest" >> beam.ParDo(_ReadManifestFn(self._manifest)))
    else:
      refs = (pbegin
              | "Patterns" >> beam.Create(self._patterns)
              | "MatchFiles" >> fileio.MatchAll()
              | "ToImageRef" >> beam.Map(
                  lambda m: ImageRef(image_id=image_id_for_uri(m.path),
                                     uri=m.path)))
    return (refs
            | "KeyById" >> beam.Map(lambda r: (r.image_id, r))
            | "GroupById" >> beam.GroupByKey()
            | "OnePerId" >> beam.Map(_first_of_duplicates))


def count_pattern_matches(patterns: Sequence[str]) -> int:
  """Counts files matched by the patterns; fails on a pattern matching none.

  Raises:
    InputError: a pattern that matches nothing, naming it.
  """
  total = 0
  results = FileSystems.match(list(patterns))
  for pattern, result in zip(patterns, results):
    n = len(result.metadata_list)
    if n == 0:
      raise InputError(
          f"--input {pattern} matches no files; check the path or quote the "
          f"pattern so the shell does not expand it")
    total += n
  return total
