"""Labelled photos for the evaluate, search and report tests.

Several crops of each of six real photos (scikit-image and scikit-learn
ship them), one label per source photo, listed in a CSV manifest with a
``species`` column holding the label (text, in varied case and spacing;
``label`` itself is an output column of the predictions table), a ``taxon_id`` column
and a ``site`` column; and a small iNaturalist-style taxa table that puts
the six sources in four genera and two families.

The labels are names from the tiny classifier's labelmap, chosen so that
the classifier's figures are neither 0 nor 1: each source gets the label the
classifier most often ranks first on its crops.  One crop carries a wrong
label, one a label that is not in the labelmap, one none at all; one listed
file does not exist (an error row).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
from typing import Dict, List

import numpy as np
from PIL import Image

# Crop boxes as fractions (left, top, right, bottom) of the source photo.
BOXES = (
    (0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.7, 0.7),
    (0.3, 0.3, 1.0, 1.0),
    (0.15, 0.0, 0.85, 0.8),
    (0.0, 0.25, 0.75, 1.0),
)
# Crops per source: unequal, so that macro and micro averages differ.
CROPS = (5, 4, 4, 3, 3, 2)
# Source -> (species taxon id, genus id, family id).
TAXONOMY = ((101, 201, 301), (102, 201, 301), (103, 202, 301),
            (104, 203, 302), (105, 203, 302), (106, 204, 302))
ORDER_ID, ROOT_ID = 400, 48460
NOT_IN_LABELMAP = "not a species"


@dataclasses.dataclass
class LabelledPhotos:
  """What ``make_labelled_photos`` wrote.

  Attributes:
    manifest: the CSV manifest (uri, image_id, species, taxon_id, site).
    taxa: the taxa table (tab-separated).
    rows: the manifest rows, as dicts.
    source_labels: the labelmap name given to each source.
  """

  manifest: str
  taxa: str
  rows: List[Dict[str, str]]
  source_labels: List[str]


def _crop(photo: Image.Image, box) -> Image.Image:
  w, h = photo.size
  crop = photo.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w),
                     int(box[3] * h)))
  crop.thumbnail((480, 480))
  return crop


def _spaced(label: str, i: int) -> str:
  """The same label written differently: case and runs of spaces."""
  if i % 3 == 1:
    return label.upper().replace(" ", "  ")
  if i % 3 == 2:
    return f" {label.title()} "
  return label


def make_labelled_photos(root: str, source_paths: List[str],
                         classifier_dir: str) -> LabelledPhotos:
  """Writes crops, a CSV manifest and a taxa table under ``root``.

  Args:
    root: an empty local folder.
    source_paths: six photo files (tests.conftest.real_photo_paths()).
    classifier_dir: the tiny fungi stand-in, used to pick the labels.
  """
  from natvision.transforms import models, preprocess  # pylint: disable=import-outside-toplevel
  from natvision.transforms.runtimes import tf as tf_runtime  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.join(root, "photos"), exist_ok=True)
  crops = []
  for s, path in enumerate(source_paths[:len(CROPS)]):
    photo = Image.open(path).convert("RGB")
    for c in range(CROPS[s]):
      crops.append((s, c, _crop(photo, BOXES[c])))
  resolved = models.resolve_models(["fungi_mobile_v1"], None, handles={
      "fungi_mobile_v1": classifier_dir})[0]
  classifier = tf_runtime.load_model(resolved)
  labelmap = models.read_labelmap(resolved.labelmap_path)
  probs = classifier.predict(np.stack([
      preprocess.prepare(img, "squash", 299) for _, _, img in crops]))
  source_labels, taken = [], set()
  for s in range(len(CROPS)):
    votes = collections.Counter()
    for (src, _, _), p in zip(crops, probs):
      if src == s:
        votes.update({int(i): 5 - r for r, i in enumerate(np.argsort(-p)[:5])})
    best = next(i for i, _ in sorted(votes.items(), key=lambda kv: (-kv[1],
                                                                    kv[0]))
                if i not in taken)
    taken.add(best)
    source_labels.append(labelmap[best])

  rows = []
  for n, (s, c, img) in enumerate(crops):
    name = f"src{s}_crop{c}.jpg"
    path = os.path.join(root, "photos", name)
    img.save(path, quality=92)
    label = _spaced(source_labels[s], n)
    taxon = str(TAXONOMY[s][0])
    rows.append({"uri": path, "image_id": f"s{s}c{c}", "species": label,
                 "taxon_id": taxon, "site": f"site {s % 3}"})
  # Label noise and gaps: a crop of source 2 labelled as source 3, a label
  # outside the labelmap, a photo without a label.
  rows[CROPS[0] + CROPS[1] + 3]["species"] = source_labels[3]
  rows[CROPS[0] + CROPS[1] + 3]["taxon_id"] = str(TAXONOMY[3][0])
  rows[1]["species"] = NOT_IN_LABELMAP
  rows[1]["taxon_id"] = ""
  rows[-1]["species"] = ""
  rows[-1]["taxon_id"] = ""

  # A listed photo whose file is gone: a row in the errors table (stage read).
  rows.append({"uri": os.path.join(root, "photos", "deleted.jpg"),
               "image_id": "gone", "species": source_labels[0],
               "taxon_id": str(TAXONOMY[0][0]), "site": "site 0"})

  manifest = os.path.join(root, "labelled.csv")
  with open(manifest, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, ["uri", "image_id", "species", "taxon_id",
                                "site"])
    writer.writeheader()
    writer.writerows(rows)

  taxa = os.path.join(root, "taxa.csv")
  lines = ["taxon_id\tancestry\trank_level\trank\tname\tactive",
           f"{ROOT_ID}\t\t100\tstateofmatter\tLife\ttrue",
           f"{ORDER_ID}\t{ROOT_ID}\t40\torder\tOrdo testus\ttrue"]
  for family in sorted({t[2] for t in TAXONOMY}):
    lines.append(f"{family}\t{ROOT_ID}/{ORDER_ID}\t30\tfamily\t"
                 f"Familia {family}\ttrue")
  for genus, family in sorted({(t[1], t[2]) for t in TAXONOMY}):
    lines.append(f"{genus}\t{ROOT_ID}/{ORDER_ID}/{family}\t20\tgenus\t"
                 f"Genus {genus}\ttrue")
  for s, (species, genus, family) in enumerate(TAXONOMY):
    lines.append(f"{species}\t{ROOT_ID}/{ORDER_ID}/{family}/{genus}\t10\t"
                 f"species\t{source_labels[s]}\ttrue")
  with open(taxa, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return LabelledPhotos(manifest=manifest, taxa=taxa, rows=rows,
                        source_labels=source_labels)
