"""Synthetic iNaturalist open-data snapshots, with real photos on local disk.

A ``SyntheticINat`` holds a small world of observations and their photos
that tests change between snapshots (new observations, an upgrade from
needs_id to research, a deleted photo file) and writes each state as a
snapshot folder in the open-data layout: ``photos``, ``observations`` and
``taxa`` tables, tab-separated and unquoted (``.csv`` or ``.csv.gz``, as
iNaturalist publishes them) or Parquet with the same columns.  Photo files
live in a store laid out like the public bucket,
``<store>/<photo_id>/medium.<extension>``, and are small crops of the real
photos shipped in scikit-image and scikit-learn.

The taxonomy is a real slice of iNaturalist's (ids and ancestry as on
inaturalist.org), so filters by subtree (Fungi 47170, Plantae 47126, Aves 3)
behave as they would on the real tables.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import os
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

LIFE = 48460
ANIMALIA = 1
AVES = 3
PLANTAE = 47126
FUNGI = 47170

# taxon_id, ancestry, rank_level, rank, name
TAXA: Tuple[Tuple[int, str, float, str, str], ...] = (
    (LIFE, "", 100, "stateofmatter", "Life"),
    (ANIMALIA, "48460", 70, "kingdom", "Animalia"),
    (2, "48460/1", 60, "phylum", "Chordata"),
    (AVES, "48460/1/2/355675", 50, "class", "Aves"),
    (7823, "48460/1/2/355675/3/7251/7823", 20, "genus", "Corvus"),
    (8021, "48460/1/2/355675/3/7251/7823/8021", 10, "species",
     "Corvus corax"),
    (PLANTAE, "48460", 70, "kingdom", "Plantae"),
    (47125, "48460/47126/211194", 50, "class", "Magnoliopsida"),
    (55745, "48460/47126/211194/47125/47124/47132/47131", 10, "species",
     "Bellis perennis"),
    (FUNGI, "48460", 70, "kingdom", "Fungi"),
    (47169, "48460/47170/47169", 60, "phylum", "Basidiomycota"),
    (48715, "48460/47170/47169/492000/50814/47167/47166/47165", 10,
     "species", "Amanita muscaria"),
    (47348, "48460/47170/47169/492000/50814/47167/47348", 20, "genus",
     "Boletus"),
)

SPECIES = {"raven": 8021, "daisy": 55745, "fly_agaric": 48715,
           "bolete": 47348, "fungi": FUNGI, "plant": PLANTAE}

PHOTO_COLUMNS = ("photo_uuid", "photo_id", "observation_uuid", "observer_id",
                 "extension", "license", "width", "height", "position")
OBSERVATION_COLUMNS = ("observation_uuid", "observer_id", "latitude",
                       "longitude", "positional_accuracy", "taxon_id",
                       "quality_grade", "observed_on", "anomaly_score")
TAXA_COLUMNS = ("taxon_id", "ancestry", "rank_level", "rank", "name",
                "active")


def _source_images() -> List[Image.Image]:
  from tests import conftest  # pylint: disable=import-outside-toplevel
  images = []
  for path in conftest.real_photo_paths():
    with Image.open(path) as img:
      images.append(img.convert("RGB"))
  return images


@dataclasses.dataclass
class Observation:
  observation_uuid: str
  observer_id: int
  latitude: Optional[float]
  longitude: Optional[float]
  positional_accuracy: Optional[int]
  taxon_id: Optional[int]
  quality_grade: str
  observed_on: Optional[str]
  anomaly_score: float = 0.0

  def values(self) -> Tuple:
    return tuple(getattr(self, c) for c in OBSERVATION_COLUMNS)


@dataclasses.dataclass
class Photo:
  photo_uuid: str
  photo_id: int
  observation_uuid: str
  observer_id: int
  extension: str
  license: str
  width: int
  height: int
  position: int

  def values(self) -> Tuple:
    return tuple(getattr(self, c) for c in PHOTO_COLUMNS)


def _cell(value) -> str:
  return "" if value is None else str(value)


def _tsv(columns: Sequence[str], rows: Sequence[Tuple]) -> bytes:
  lines = ["\t".join(columns)]
  lines.extend("\t".join(_cell(v) for v in row) for row in rows)
  return ("\n".join(lines) + "\n").encode("utf-8")


class SyntheticINat:
  """A small, changing world of observations written as snapshots.

  Args:
    root: folder for the photo store and the snapshots.
    seed: makes uuids, coordinates and photo crops deterministic.
  """

  def __init__(self, root: str, seed: int = 0):
    self.root = str(root)
    self.store = os.path.join(self.root, "photo_store")
    os.makedirs(self.store, exist_ok=True)
    self._rng = np.random.default_rng(seed)
    self._next_photo_id = 1000
    self._next_observer = 1
    self._sources: Optional[List[Image.Image]] = None
    self.observations: Dict[str, Observation] = {}
    self.photos: List[Photo] = []

  @property
  def template(self) -> str:
    """The --photo_uri_template of the store."""
    return os.path.join(self.store, "{photo_id}", "medium.{extension}")

  def photo_path(self, photo: Photo) -> str:
    return os.path.join(self.store, str(photo.photo_id),
                        f"medium.{photo.extension}")

  def _uuid(self) -> str:
    return str(uuid.UUID(bytes=self._rng.bytes(16), version=4))

  def _write_photo(self, photo_id: int, extension: str) -> Tuple[int, int]:
    if self._sources is None:
      self._sources = _source_images()
    source = self._sources[photo_id % len(self._sources)]
    w, h = source.size
    cw, ch = min(w, 160), min(h, 120)
    x = int(self._rng.integers(0, w - cw + 1))
    y = int(self._rng.integers(0, h - ch + 1))
    crop = source.crop((x, y, x + cw, y + ch))
    folder = os.path.join(self.store, str(photo_id))
    os.makedirs(folder, exist_ok=True)
    crop.save(os.path.join(folder, f"medium.{extension}"))
    return crop.size

  def observe(self, taxon: Optional[int], quality_grade: str = "research",
              photos: int = 1, extension: str = "jpg",
              observed_on: Optional[str] = "2024-01-01",
              licence: str = "cc-by") -> Observation:
    """Adds an observation with ``photos`` photos (files written now)."""
    observer = self._next_observer
    self._next_observer += 1
    obs = Observation(
        observation_uuid=self._uuid(), observer_id=observer,
        latitude=round(float(self._rng.uniform(-60, 70)), 6),
        longitude=round(float(self._rng.uniform(-180, 180)), 6),
        positional_accuracy=int(self._rng.integers(3, 500)),
        taxon_id=taxon, quality_grade=quality_grade, observed_on=observed_on,
        anomaly_score=round(float(self._rng.uniform(0, 1)), 3))
    self.observations[obs.observation_uuid] = obs
    for position in range(photos):
      self.add_photo(obs, extension=extension, position=position,
                     licence=licence)
    return obs

  def add_photo(self, obs: Observation, extension: str = "jpg",
                position: int = 0, licence: str = "cc-by",
                photo_id: Optional[int] = None) -> Photo:
    """Adds a photo to an observation (or an existing photo to another)."""
    if photo_id is None:
      photo_id = self._next_photo_id
      self._next_photo_id += 1
      width, height = self._write_photo(photo_id, extension)
      photo_uuid = self._uuid()
    else:
      first = next(p for p in self.photos if p.photo_id == photo_id)
      width, height, photo_uuid = first.width, first.height, first.photo_uuid
    photo = Photo(photo_uuid=photo_uuid, photo_id=photo_id,
                  observation_uuid=obs.observation_uuid,
                  observer_id=obs.observer_id, extension=extension,
                  license=licence, width=width, height=height,
                  position=position)
    self.photos.append(photo)
    return photo

  def regrade(self, obs: Observation, quality_grade: str) -> None:
    obs.quality_grade = quality_grade

  def delete_photo_file(self, photo: Photo) -> None:
    """Removes a photo's file; the photos row stays (as in the open data)."""
    os.remove(self.photo_path(photo))

  def photos_of(self, obs: Observation) -> List[Photo]:
    return [p for p in self.photos
            if p.observation_uuid == obs.observation_uuid]

  def write_snapshot(self, name: str, fmt: str = "csv",
                     taxa: bool = True, extra_lines: Dict[str, List[str]] = None
                     ) -> str:
    """Writes the current state as a snapshot folder.

    Args:
      name: folder name under root (e.g. the snapshot date).
      fmt: ``csv`` (tab-separated, as published), ``csv.gz`` or ``parquet``.
      taxa: whether to write the taxa table.
      extra_lines: raw lines appended to a text table (malformed rows).

    Returns:
      The snapshot folder.
    """
    folder = os.path.join(self.root, "snapshots", name)
    os.makedirs(folder, exist_ok=True)
    tables = {
        "photos": (PHOTO_COLUMNS, [p.values() for p in self.photos]),
        "observations": (OBSERVATION_COLUMNS,
                         [o.values() for o in self.observations.values()]),
    }
    if taxa:
      tables["taxa"] = (TAXA_COLUMNS,
                        [t + ("true",) for t in TAXA])
    for table, (columns, rows) in tables.items():
      if fmt == "parquet":
        pq.write_table(_arrow(table, columns, rows),
                       os.path.join(folder, f"{table}.parquet"))
        continue
      data = _tsv(columns, rows)
      for line in (extra_lines or {}).get(table, []):
        data += (line + "\n").encode("utf-8")
      path = os.path.join(folder, f"{table}.{fmt}")
      with open(path, "wb") as f:
        f.write(gzip.compress(data) if fmt.endswith(".gz") else data)
    return folder


_ARROW_TYPES = {
    "photo_id": pa.int64(), "observer_id": pa.int64(), "width": pa.int32(),
    "height": pa.int32(), "position": pa.int32(), "latitude": pa.float64(),
    "longitude": pa.float64(), "positional_accuracy": pa.int32(),
    "taxon_id": pa.int64(), "anomaly_score": pa.float64(),
    "rank_level": pa.float64(), "observed_on": pa.date32(),
    "active": pa.bool_(),
}


def _arrow(table: str, columns: Sequence[str], rows: Sequence[Tuple]
           ) -> pa.Table:
  del table
  data = {}
  for i, column in enumerate(columns):
    values = [row[i] for row in rows]
    dtype = _ARROW_TYPES.get(column, pa.string())
    if dtype == pa.date32():
      values = [datetime.date.fromisoformat(v) if v else None for v in values]
    if dtype == pa.bool_():
      values = [v == "true" for v in values]
    data[column] = pa.array(values, dtype)
  return pa.table(data)
