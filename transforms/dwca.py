"""Darwin Core input: GBIF downloads and IPT archives as photo references.

``--input`` may be a Darwin Core Archive (a ``.zip``, or a folder holding
``meta.xml``) or a bare GBIF ``multimedia.txt``.  Each row of the archive's
multimedia extension whose type is StillImage is one photo, whatever its
``format`` says (what the server sends back decides); rows of other types
(Sound, MovingImage, empty) are not fetched and are counted as
``skipped_not_image``.  The photo's URL is ``identifier`` (GBIF Simple
Multimedia) or ``accessURI`` (Audubon Core, where ``identifier`` may be a
UUID).

Every photo carries the multimedia row's fields and a chosen set of the
core record's fields (``CORE_FIELDS``), joined on the core id inside the
pipeline (a CoGroupByKey), so an archive of millions of records never sits
in one process; a multimedia row whose core record is missing is processed
all the same, with empty core fields.  A core field whose name a
multimedia field already takes (``license``, ``rightsHolder``, ``type``)
is carried as ``occurrence_<name>``.

``meta.xml`` and the data files are parsed by python-dwca-reader.  An
archive on gs:// or s3:// is copied to a local temporary folder first, in
the launcher for ``meta.xml`` alone and in the worker for its data files;
of a zip, only the files read are extracted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from transforms import sources
from transforms import storage
from transforms import uris
from transforms.records import ImageRef

MULTIMEDIA_TYPES = ("http://rs.gbif.org/terms/1.0/Multimedia",
                    "http://rs.tdwg.org/ac/terms/Multimedia")
ACCESS_URI = "http://rs.tdwg.org/ac/terms/accessURI"
IDENTIFIERS = ("http://purl.org/dc/terms/identifier",
               "http://purl.org/dc/elements/1.1/identifier")
TYPES = ("http://purl.org/dc/terms/type",
         "http://purl.org/dc/elements/1.1/type")
STILL_IMAGE = "stillimage"
SKIPPED_NOT_IMAGE = "skipped_not_image"
SKIPPED_TAG = "skipped"
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


def short(term: str) -> str:
  """The column name of a term URI (its last path segment)."""
  return term.rstrip("/").split("/")[-1].split("#")[-1]


@dataclasses.dataclass(frozen=True)
class Archive:
  """A checked Darwin Core input and the columns its photos carry.

  Attributes:
    path: the .zip, the folder holding meta.xml, or the multimedia.txt.
    kind: ``zip``, ``folder`` or ``multimedia``.
    meta: meta.xml's text (empty for a bare multimedia.txt).
    media_file: the multimedia file's location inside the archive.
    media_columns: (column, term) carried from each multimedia row.
    core_file: the core file's location; None for a bare multimedia.txt.
    core_columns: (column, term) carried from the core record.
    url_term: the term holding the photo's URL.
    type_term: the term holding the row's type; None when there is none.
  """

  path: str
  kind: str
  meta: str
  media_file: str
  media_columns: Tuple[Tuple[str, str], ...]
  core_file: Optional[str]
  core_columns: Tuple[Tuple[str, str], ...]
  url_term: str
  type_term: Optional[str]

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


@contextlib.contextmanager
def _local(path: str, kind: str, names: Sequence[str]) -> Iterator[str]:
  """A local folder holding ``names`` of the archive (extracted or copied).

  Yields:
    The folder; removed afterwards when it is a temporary one.
  """
  if kind == "folder" and not path.lower().startswith(("gs://", "s3://")):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="natvision-dwca-")
  try:
    if kind == "zip":
      with FileSystems.open(path) if "://" in path else open(path, "rb") as f:
        source = f
        if "://" in path:  # zip needs a seekable local file
          local_zip = os.path.join(tmp, "_archive.zip")
          with open(local_zip, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
          source = local_zip
        with zipfile.ZipFile(source) as z:
          members = {os.path.basename(m.filename): m.filename
                     for m in z.infolist() if not m.is_dir()}
          for name in names:
            member = name if name in z.namelist() else members.get(
                os.path.basename(name))
            if member is None:
              raise sources.InputError(f"{path} has no {name}")
            with z.open(member) as src, open(os.path.join(tmp, name),
                                             "wb") as out:
              shutil.copyfileobj(src, out, 1 << 20)
    else:  # a remote folder, or a bare multimedia.txt anywhere
      for name in names:
        src_path = (path if kind == "multimedia"
                    else FileSystems.join(path.rstrip("/"), name))
        with FileSystems.open(src_path) as src, open(
            os.path.join(tmp, name), "wb") as out:
          shutil.copyfileobj(src, out, 1 << 20)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _descriptor(meta: str):
  from dwca.descriptors import ArchiveDescriptor  # pylint: disable=import-outside-toplevel
  return ArchiveDescriptor(meta)


def _bare_descriptor(folder: str, name: str):
  """The descriptor of a bare GBIF multimedia.txt: tab-separated, unquoted,
  a header of short term names, gbifID as the row id."""
  from dwca.descriptors import DataFileDescriptor  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
    header = f.readline().rstrip("\r\n").split("\t")
  fields = [{"index": i, "term": _gbif_term(c), "default": None}
            for i, c in enumerate(header)]
  id_index = header.index(GBIF_ID) if GBIF_ID in header else None
  return DataFileDescriptor(
      created_from_file=True, raw_element=None, represents_corefile=True,
      datafile_type=MULTIMEDIA_TYPES[0], file_location=name,
      file_encoding="utf-8", id_index=id_index, coreid_index=None,
      fields=fields, lines_terminated_by="\n", fields_enclosed_by="",
      fields_terminated_by="\t")


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


def open_archive(path: str) -> Archive:
  """Reads and checks a Darwin Core input's descriptor, before the job runs.

  Raises:
    InputError: no multimedia extension, no URL column, or an unreadable
      archive, naming the file.
  """
  lower = path.rstrip("/").lower()
  kind = ("zip" if lower.endswith(".zip") else
          "multimedia" if os.path.basename(lower) == "multimedia.txt"
          else "folder")
  try:
    if kind == "multimedia":
      name = "multimedia.txt"
      with _local(path, kind, [name]) as folder:
        media = _bare_descriptor(folder, name)
      meta, core = "", None
    else:
      with _local(path, kind, ["meta.xml"]) as folder:
        with open(os.path.join(folder, "meta.xml"), encoding="utf-8") as f:
          meta = f.read()
      descriptor = _descriptor(meta)
      media = next((e for e in descriptor.extensions
                    if e.type in MULTIMEDIA_TYPES), None)
      if media is None:
        raise sources.InputError(
            f"{path} has no multimedia extension (rowType "
            f"{' or '.join(MULTIMEDIA_TYPES)}); request a download with "
            f"multimedia, or give a manifest of photo URLs")
      core = descriptor.core
  except sources.InputError:
    raise
  except Exception as e:  # noqa: BLE001 - any read or parse failure
    raise sources.InputError(
        f"{path} cannot be read as a Darwin Core archive: {e}") from e
  media_terms = [f["term"] for f in media.fields]
  url_term = _pick(media_terms, (ACCESS_URI,) + IDENTIFIERS)
  if url_term is None:
    raise sources.InputError(
        f"{path}: the multimedia file {media.file_location} has neither "
        f"accessURI nor identifier, so no photo URL")
  taken: Dict[str, None] = {}
  media_columns = _columns(media_terms, taken, MEDIA_PREFIX)
  core_columns: Tuple[Tuple[str, str], ...] = ()
  if core is not None:
    core_columns = _columns([f["term"] for f in core.fields], taken,
                            CORE_PREFIX, keep=CORE_FIELDS)
  return Archive(path=path, kind=kind, meta=meta,
                 media_file=media.file_location, media_columns=media_columns,
                 core_file=core.file_location if core is not None else None,
                 core_columns=core_columns, url_term=url_term,
                 type_term=_pick(media_terms, TYPES))


def _iter_rows(archive: Archive, which: str) -> Iterator[Tuple[str, dict]]:
  """(core id, {term: value}) of each row of the core or multimedia file."""
  from dwca.files import CSVDataFile  # pylint: disable=import-outside-toplevel
  name = archive.core_file if which == "core" else archive.media_file
  with _local(archive.path, archive.kind, [name]) as folder:
    if archive.kind == "multimedia":
      descriptor = _bare_descriptor(folder, name)
    else:
      desc = _descriptor(archive.meta)
      descriptor = desc.core if which == "core" else next(
          e for e in desc.extensions if e.file_location == name)
    data = CSVDataFile(folder, descriptor)
    try:
      for row in data.iter_rows():
        key = getattr(row, "core_id", None) if which == "media" else None
        if key is None:
          key = getattr(row, "id", None)
        yield (key or ""), row.data
    finally:
      data.close()


def image_id(core_id: str, url: str) -> str:
  """Stable across runs and distinct per photo: the record and the URL."""
  return hashlib.sha256(
      uris.uri_bytes(f"{core_id}\x00{url}")).hexdigest()[:20]


def is_still_image(value: Optional[str]) -> bool:
  """``StillImage`` or its DCMI type URI, in any case."""
  return bool(value) and short(value.strip()).lower() == STILL_IMAGE


class _RowsFn(beam.DoFn):

  def __init__(self, archive: Archive, which: str):
    self._archive = archive
    self._which = which

  def process(self, path: str) -> Iterator[Tuple[str, dict]]:
    del path
    columns = (self._archive.core_columns if self._which == "core"
               else self._archive.media_columns)
    wanted = [t for _, t in columns]
    for key, data in _iter_rows(self._archive, self._which):
      values = {t: data.get(t) for t in wanted}
      if self._which == "media":
        values[self._archive.url_term] = data.get(self._archive.url_term)
        if self._archive.type_term:
          values[self._archive.type_term] = data.get(self._archive.type_term)
      yield key, values


def _refs(item, archive: Archive) -> Iterator:
  key, groups = item
  core = next(iter(groups["core"]), {}) if "core" in groups else {}
  for media in groups["media"]:
    kind = media.get(archive.type_term) if archive.type_term else None
    if not is_still_image(kind):
      yield beam.pvalue.TaggedOutput(SKIPPED_TAG, SKIPPED_NOT_IMAGE)
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
  """A Darwin Core input -> ImageRefs (main) and ``skipped`` reasons.

  Args:
    archive: from ``open_archive``.
  """

  def __init__(self, archive: Archive):
    super().__init__()
    self._archive = archive

  def expand(self, pbegin):
    archive = self._archive
    path = pbegin | "ArchivePath" >> beam.Create([uris.readable(archive.path)])
    groups = {"media": path | "MultimediaRows" >> beam.ParDo(
        _RowsFn(archive, "media"))}
    if archive.core_file is not None:
      groups["core"] = path | "CoreRows" >> beam.ParDo(_RowsFn(archive, "core"))
    return (groups
            | "JoinOnCoreId" >> beam.CoGroupByKey()
            | "PhotoRefs" >> beam.FlatMap(_refs, archive).with_outputs(
                SKIPPED_TAG, main="refs"))


def columns_of(archive: Archive) -> List[str]:
  """The carried column names, in order."""
  return [name for name, _ in archive.carried]
