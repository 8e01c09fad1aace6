"""Darwin Core input: GBIF downloads and IPT archives as photo references.

Decides what an archive holds (meta.xml, the columns carried), which rows
are photos, their stable ids, and the graph that joins them to the core.

``--input`` may be a Darwin Core Archive (a ``.zip``, or a folder holding
``meta.xml``) or a bare GBIF ``multimedia.txt``.  The photo's URL is
``identifier`` (GBIF Simple Multimedia) or ``accessURI`` (Audubon Core,
where ``identifier`` may be a UUID).

Which multimedia rows are photos (``photo_or_skip``): a row whose ``type``
says StillImage in any spelling (``StillImage``, ``Still Image``, the DCMI
URI ``http://purl.org/dc/dcmitype/StillImage``, ``dcmitype:StillImage``,
``image``, ``photo``) is a photo whatever its ``format`` says (what the
server sends back decides).  When ``type`` is empty or is itself a MIME
type (the two columns swapped), the MIME type (``type`` then ``format``)
decides, as GBIF does: ``image/*`` is a photo.  Every other row is counted
by reason, never fetched: ``skipped_sound``, ``skipped_video``,
``skipped_no_image_format`` (no type and no image MIME type) and
``skipped_other_type`` (e.g. ``Text``, ``InteractiveResource``).

Every photo carries the multimedia row's fields and a chosen set of the
core record's fields (``CORE_FIELDS``), joined on the core id inside the
pipeline (a CoGroupByKey), so an archive of millions of records never sits
in one process; a multimedia row whose core record is missing is processed
all the same, with empty core fields.  A core field whose name a
multimedia field already takes (``license``, ``rightsHolder``, ``type``)
is carried as ``occurrence_<name>``.

Reading.  python-dwca-reader parses ``meta.xml`` (field indices, terms,
defaults, delimiters, declared encoding); the data files are read by
transforms/dwca_files.py, streaming, by Python's ``csv`` module over a
strictly decoded text stream, because python-dwca-reader fails the whole
archive on one short line, reads only the first ``<location>``, splits
lines on the declared terminator only and decodes bad bytes as U+FFFD.
So:

- every ``<location>`` of the core and of the multimedia extension is read;
- ``\\n``, ``\\r\\n`` and ``\\r`` all end a line, whatever
  ``linesTerminatedBy`` says; a file written with another ending than the
  declared one is read as written, with a warning (``warnings`` in
  run.json, logged at launch);
- a line with fewer fields than meta.xml's highest index needs, or with
  another number of fields than the file's header, or that the csv module
  cannot parse, is a counted skip (``skipped_bad_lines``), its first
  ``summary.EXAMPLES`` named as ``file:line: why`` in run.json
  (``bad_lines``).  A bad line is a skip, not an error row, because its
  fields are shifted or missing: no trustworthy photo URL or core id to
  name a photo by.  The rest of the archive goes on.  A line with no
  characters at all is not a record and is ignored, as in manifests;
- bytes that are not valid in the declared encoding (or
  ``--archive_encoding``) refuse the input before the job runs
  (``dwca_files.ArchiveEncodingError``, exit 2), naming the file, line,
  byte offset and encoding, as manifests do (transforms/sources.py): a
  replaced byte would corrupt the creator and rightsHolder a CC BY licence
  requires in every table, and a skip would lose photos that a rerun with
  the right encoding reads whole.  The launcher decodes the first
  ``CHECK_BYTES`` (16 MiB) of every data file (``check_data_files``), so
  a wrong encoding fails in seconds whatever the archive's size; the
  workers decode every byte strictly again, so a bad byte further on fails
  the job (nothing is committed) with the same message.

An archive on gs:// or s3:// is copied to a local temporary folder first;
of a local zip, the data files are read straight from the zip.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import logging
import os
import re
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import sources
from natvision.transforms import storage
from natvision.transforms import uris
from natvision.transforms.dwca_files import (BadLine, DataFile, archive_kind,
                                   check_data_files, open_files, read_lines,
                                   read_records)

MULTIMEDIA_TYPES = ("http://rs.gbif.org/terms/1.0/Multimedia",
                    "http://rs.tdwg.org/ac/terms/Multimedia")
ACCESS_URI = "http://rs.tdwg.org/ac/terms/accessURI"
IDENTIFIERS = ("http://purl.org/dc/terms/identifier",
               "http://purl.org/dc/elements/1.1/identifier")
TYPES = ("http://purl.org/dc/terms/type",
         "http://purl.org/dc/elements/1.1/type")
FORMATS = ("http://purl.org/dc/terms/format",
           "http://purl.org/dc/elements/1.1/format")
SKIPPED_TAG = "skipped"
BAD_LINES_TAG = "bad_lines"
# Why a row was not fetched; each is a count in run.json.
SKIPPED_SOUND = "skipped_sound"
SKIPPED_VIDEO = "skipped_video"
SKIPPED_NO_IMAGE_FORMAT = "skipped_no_image_format"
SKIPPED_OTHER_TYPE = "skipped_other_type"
SKIPPED_BAD_LINES = "skipped_bad_lines"
SKIP_REASONS = (SKIPPED_SOUND, SKIPPED_VIDEO, SKIPPED_NO_IMAGE_FORMAT,
                SKIPPED_OTHER_TYPE, SKIPPED_BAD_LINES)
CORE_PREFIX = "occurrence_"
MEDIA_PREFIX = "media_"
GBIF_ID = "gbifID"

# Core fields carried into the tables when the core file has them.
CORE_FIELDS = (
    "gbifID", "occurrenceID", "catalogNumber", "basisOfRecord",
    "institutionCode", "collectionCode", "datasetKey", "datasetName",
    "scientificName", "acceptedScientificName", "taxonKey",
    "acceptedTaxonKey", "taxonRank", "kingdom", "phylum", "class", "order",
    "family", "genus", "species", "vernacularName", "decimalLatitude",
    "decimalLongitude", "coordinateUncertaintyInMeters", "eventDate", "year",
    "month", "day", "countryCode", "stateProvince", "locality", "recordedBy",
    "identifiedBy", "license", "rightsHolder", "type", "publisher")

_log = logging.getLogger("natvision")


def short(term: str) -> str:
  """The column name of a term URI (its last path segment)."""
  return term.rstrip("/").split("/")[-1].split("#")[-1]


@dataclasses.dataclass(frozen=True)
class Archive:
  """A checked Darwin Core input and the columns its photos carry.

  Attributes:
    path: the .zip, the folder holding meta.xml, or the multimedia.txt.
    kind: ``zip``, ``folder`` or ``multimedia``.
    media: how to read the multimedia files.
    core: how to read the core files; None for a bare multimedia.txt.
    media_columns: (column, term) carried from each multimedia row.
    core_columns: (column, term) carried from the core record.
    url_term: the term holding the photo's URL.
    type_term: the term holding the row's type; None when there is none.
    format_term: the term holding the row's MIME type; None when none.
    warnings: what the launcher noticed and read through (line endings).
  """

  path: str
  kind: str
  media: DataFile
  core: Optional[DataFile]
  media_columns: Tuple[Tuple[str, str], ...]
  core_columns: Tuple[Tuple[str, str], ...]
  url_term: str
  type_term: Optional[str]
  format_term: Optional[str] = None
  warnings: Tuple[str, ...] = ()

  @property
  def carried(self) -> Tuple[Tuple[str, pa.DataType], ...]:
    return tuple((name, pa.string())
                 for name, _ in self.media_columns + self.core_columns)


def is_archive_input(path: str) -> bool:
  """Whether ``--input`` names Darwin Core input (no I/O but for folders).

  A ``.zip``, a file named ``multimedia.txt``, or a folder holding
  ``meta.xml``.
  """
  name = path.rstrip("/").lower()
  if name.endswith(".zip") or os.path.basename(name) == "multimedia.txt":
    return True
  if any(c in path for c in "*?[") or path.lower().startswith(
      ("http://", "https://")):
    return False
  # A storage failure is not "no meta.xml": it fails the launch.
  return storage.exists(FileSystems.join(path.rstrip("/"), "meta.xml"))


def _codec(encoding: str, where: str) -> str:
  try:
    return codecs.lookup(encoding).name
  except LookupError as e:
    raise sources.InputError(
        f"{where}: {encoding!r} is not a known encoding; pass "
        f"--archive_encoding (e.g. utf-8, cp1252)") from e


def _data_file(path: str, descriptor, encoding: Optional[str]) -> DataFile:
  """A ``DataFile`` from python-dwca-reader's descriptor of a meta.xml part."""
  element = descriptor.raw_element
  locations = tuple(loc.text.strip()
                    for loc in element.findall("./{*}files/{*}location")
                    if loc.text and loc.text.strip())
  declared = encoding or descriptor.file_encoding or "UTF-8"
  delimiter = descriptor.fields_terminated_by
  quote = descriptor.fields_enclosed_by or ""
  if len(delimiter) != 1 or len(quote) > 1:
    raise sources.InputError(
        f"{path}: meta.xml's fieldsTerminatedBy {delimiter!r} and "
        f"fieldsEnclosedBy {quote!r} for {descriptor.file_location} must be "
        f"one character (fieldsEnclosedBy may be empty)")
  key_index = (descriptor.id_index if descriptor.represents_corefile
               else descriptor.coreid_index)
  return DataFile(
      locations=tuple(dict.fromkeys(locations)) or (
          descriptor.file_location,),
      encoding=_codec(declared, f"{path}: encoding of "
                      f"{descriptor.file_location}"),
      declared_encoding=declared, delimiter=delimiter,
      quote=quote,
      header_lines=int(element.get("ignoreHeaderLines") or 0),
      key_index=key_index,
      fields=tuple((f["index"], f["term"], f["default"])
                   for f in descriptor.fields),
      declared_ending=descriptor.lines_terminated_by)


def _bare_data_file(path: str, encoding: Optional[str]) -> DataFile:
  """A bare GBIF multimedia.txt: tab-separated, unquoted, a header of short
  term names, gbifID as the core id."""
  name = "multimedia.txt"
  declared = encoding or "UTF-8"
  probe = DataFile(locations=(name,), encoding=_codec(declared, path),
                   declared_encoding=declared, delimiter="\t", quote="",
                   header_lines=1, key_index=None, fields=())
  with open_files(path, "multimedia", [name]) as open_file:
    with open_file(name) as f:
      header = next(read_lines(f, path, name, probe), "")
  header = header.rstrip("\r\n").split("\t")
  header = [c.strip() for c in header]
  return dataclasses.replace(
      probe, key_index=header.index(GBIF_ID) if GBIF_ID in header else None,
      fields=tuple((i, _gbif_term(c), None) for i, c in enumerate(header)))


_GBIF_TERMS = {
    "gbifID": "http://rs.gbif.org/terms/1.0/gbifID",
    "identifier": IDENTIFIERS[0], "type": TYPES[0],
    "accessURI": ACCESS_URI,
}


def _gbif_term(column: str) -> str:
  return _GBIF_TERMS.get(column, f"http://purl.org/dc/terms/{column}")


def _columns(terms: Sequence[str], taken: Dict[str, None], prefix: str,
             keep: Optional[Sequence[str]] = None
             ) -> Tuple[Tuple[str, str], ...]:
  """(column, term) for each term, names made unique and never reserved."""
  reserved = {c.lower() for c in sources.RESERVED_COLUMNS} | {
      sources.URI_COLUMN, sources.ID_COLUMN}
  out = []
  for term in terms:
    name = short(term)
    if keep is not None and name not in keep:
      continue
    if name.lower() in {t.lower() for t in taken} or name.lower() in reserved:
      name = prefix + name
    if name.lower() in {t.lower() for t in taken}:
      continue
    taken[name] = None
    out.append((name, term))
  return tuple(out)


def _pick(terms: Sequence[str], wanted: Sequence[str]) -> Optional[str]:
  return next((t for t in wanted if t in terms), None)


def open_archive(path: str, encoding: Optional[str] = None) -> Archive:
  """Reads and checks a Darwin Core input before the job runs.

  Parses meta.xml, then decodes every data file it names once, streaming
  (``check_data_files``).

  Args:
    path: the .zip, a folder holding meta.xml, or a multimedia.txt.
    encoding: ``--archive_encoding``: the encoding of every data file,
      instead of what meta.xml declares (a bare multimedia.txt: UTF-8).

  Raises:
    ArchiveEncodingError: bytes not valid in a data file's encoding,
      naming the file, line and byte offset.
    InputError: no multimedia extension, no URL column, or an unreadable
      archive, naming the file.
  """
  kind = archive_kind(path)
  try:
    if kind == "multimedia":
      media, core = _bare_data_file(path, encoding), None
    else:
      with open_files(path, kind, ["meta.xml"]) as open_file:
        with open_file("meta.xml") as f:
          meta = f.read().decode("utf-8-sig")
      from dwca.descriptors import ArchiveDescriptor  # pylint: disable=import-outside-toplevel
      descriptor = ArchiveDescriptor(meta)
      found = next((e for e in descriptor.extensions
                    if e.type in MULTIMEDIA_TYPES), None)
      if found is None:
        raise sources.InputError(
            f"{path} has no multimedia extension (rowType "
            f"{' or '.join(MULTIMEDIA_TYPES)}); request a download with "
            f"multimedia, or give a manifest of photo URLs")
      media = _data_file(path, found, encoding)
      core = _data_file(path, descriptor.core, encoding)
  except sources.InputError:
    raise
  except Exception as e:  # noqa: BLE001 - any read or parse failure
    raise sources.InputError(
        f"{path} cannot be read as a Darwin Core archive: {e}") from e
  url_term = _pick(media.terms, (ACCESS_URI,) + IDENTIFIERS)
  if url_term is None:
    raise sources.InputError(
        f"{path}: the multimedia file {media.locations[0]} has neither "
        f"accessURI nor identifier, so no photo URL")
  try:
    warnings = check_data_files(path, kind, [p for p in (core, media) if p])
  except sources.InputError:
    raise
  except (OSError, zipfile.BadZipFile) as e:
    raise sources.InputError(f"{path}: a data file cannot be read: {e}"
                             ) from e
  for warning in warnings:
    _log.warning("%s: %s", path, warning)
  taken: Dict[str, None] = {}
  media_columns = _columns(media.terms, taken, MEDIA_PREFIX)
  core_columns: Tuple[Tuple[str, str], ...] = ()
  if core is not None:
    core_columns = _columns(core.terms, taken, CORE_PREFIX, keep=CORE_FIELDS)
  return Archive(path=path, kind=kind, media=media, core=core,
                 media_columns=media_columns, core_columns=core_columns,
                 url_term=url_term, type_term=_pick(media.terms, TYPES),
                 format_term=_pick(media.terms, FORMATS),
                 warnings=tuple(warnings))


def image_id(core_id: str, url: str) -> str:
  """Stable across runs and distinct per photo: the record and the URL."""
  return hashlib.sha256(
      uris.uri_bytes(f"{core_id}\x00{url}")).hexdigest()[:20]


_STILL = {"stillimage", "image", "photo", "photograph", "picture"}
_SOUND = {"sound", "audio"}
_VIDEO = {"movingimage", "video", "movie", "film"}
_MIME = re.compile(r"[a-z]+/[a-z0-9][\w.+-]*(\s*;.*)?")
_MIME_SKIPS = {"audio": SKIPPED_SOUND, "video": SKIPPED_VIDEO}


def _type_word(value: str) -> str:
  """``http://purl.org/dc/dcmitype/StillImage``, ``dcmitype:StillImage``,
  ``Still Image`` -> ``stillimage``."""
  last = re.split(r"[/#:]", value.strip().rstrip("/"))[-1]
  return re.sub(r"[\s_-]", "", last).lower()


def photo_or_skip(type_value: Optional[str],
                  format_value: Optional[str]) -> Optional[str]:
  """None when a multimedia row is a photo, else the skip reason.

  ``type`` decides when it names a type (StillImage in any spelling is a
  photo; sound, video and other types are skipped); when it is empty or a
  MIME type, the MIME type (``type``, else ``format``) decides: ``image/*``
  is a photo.

  Returns:
    None, or one of ``SKIP_REASONS`` (not ``SKIPPED_BAD_LINES``).
  """
  kind = (type_value or "").strip()
  if kind and not _MIME.fullmatch(kind.lower()):
    word = _type_word(kind)
    if word in _STILL:
      return None
    return (SKIPPED_SOUND if word in _SOUND else
            SKIPPED_VIDEO if word in _VIDEO else SKIPPED_OTHER_TYPE)
  mime = (kind or (format_value or "").strip()).lower()
  if _MIME.fullmatch(mime):
    major = mime.split("/")[0]
    return None if major == "image" else _MIME_SKIPS.get(
        major, SKIPPED_NO_IMAGE_FORMAT)
  if mime and _type_word(mime) in _STILL:  # type and format swapped
    return None
  return SKIPPED_NO_IMAGE_FORMAT


class _RowsFn(beam.DoFn):
  """A data file's location -> (core id, {term: value}) per record; bad
  lines on ``BAD_LINES_TAG`` as (file, line, why)."""

  def __init__(self, archive: Archive, which: str):
    self._archive = archive
    self._which = which

  def process(self, name: str) -> Iterator:
    archive = self._archive
    data = archive.core if self._which == "core" else archive.media
    columns = (archive.core_columns if self._which == "core"
               else archive.media_columns)
    wanted = [t for _, t in columns]
    if self._which == "media":
      wanted += [t for t in (archive.url_term, archive.type_term,
                             archive.format_term) if t]
    for item in read_records(archive.path, name, data):
      if isinstance(item, BadLine):
        yield beam.pvalue.TaggedOutput(
            BAD_LINES_TAG, (item.file, item.line, item.why))
        continue
      key, values = item
      yield key, {t: values.get(t) for t in wanted}


def _refs(item, archive: Archive) -> Iterator:
  key, groups = item
  core = next(iter(groups["core"]), {}) if "core" in groups else {}
  for media in groups["media"]:
    skip = photo_or_skip(
        media.get(archive.type_term) if archive.type_term else None,
        media.get(archive.format_term) if archive.format_term else None)
    if skip:
      yield beam.pvalue.TaggedOutput(SKIPPED_TAG, skip)
      continue
    url = (media.get(archive.url_term) or "").strip()
    extra = tuple((name, _text(media.get(term)))
                  for name, term in archive.media_columns)
    extra += tuple((name, _text(core.get(term)))
                   for name, term in archive.core_columns)
    yield sources.ref_for_uri(url, image_id(key, url), extra)


def _text(value) -> Optional[str]:
  if value in (None, ""):
    return None
  return uris.readable(str(value))


class ReadArchiveRefs(beam.PTransform):
  """A Darwin Core input -> a dict of PCollections.

  ``refs``: ImageRefs; ``SKIPPED_TAG``: one skip reason (``SKIP_REASONS``)
  per row not fetched and per bad line; ``BAD_LINES_TAG``: (file, line,
  why) per bad line.  Each data file (every ``<location>``) is read by
  its own worker step.

  Args:
    archive: from ``open_archive``.
  """

  def __init__(self, archive: Archive):
    super().__init__()
    self._archive = archive

  def expand(self, pbegin):
    archive = self._archive
    parts = {"media": archive.media}
    if archive.core is not None:
      parts["core"] = archive.core
    groups, bad = {}, []
    for which, data in parts.items():
      label = "Multimedia" if which == "media" else "Core"
      rows = (pbegin
              | f"{label}Files" >> beam.Create(list(data.locations))
              | f"{label}Rows" >> beam.ParDo(
                  _RowsFn(archive, which)).with_outputs(
                      BAD_LINES_TAG, main="rows"))
      groups[which] = rows.rows
      bad.append(rows[BAD_LINES_TAG])
    split = (groups
             | "JoinOnCoreId" >> beam.CoGroupByKey()
             | "PhotoRefs" >> beam.FlatMap(_refs, archive).with_outputs(
                 SKIPPED_TAG, main="refs"))
    bad_lines = bad | "AllBadLines" >> beam.Flatten()
    skipped = ((split[SKIPPED_TAG],
                bad_lines | "BadLineSkips" >> beam.Map(
                    lambda _: SKIPPED_BAD_LINES))
               | "AllSkips" >> beam.Flatten())
    return {"refs": split.refs, SKIPPED_TAG: skipped,
            BAD_LINES_TAG: bad_lines}


def columns_of(archive: Archive) -> List[str]:
  """The carried column names, in order."""
  return [name for name, _ in archive.carried]
