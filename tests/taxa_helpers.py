"""A taxa table for the tiny fungi stand-in's placeholder labels.

Labels are grouped eight to a genus and 64 to a family under one kingdom
and a root; the first ``unmatched`` labels are left out of the table, so
they match no taxon.
"""

import csv
from typing import Dict, List, Tuple

ROOT, KINGDOM = 1, 2


def write_standin_taxa(labelmap: str, path: str, unmatched: int = 10
                       ) -> Tuple[List[str], Dict[int, int]]:
  """Writes an iNaturalist-style taxa table (tab-separated) at ``path``.

  Returns:
    (labels, taxon of each matched label id).
  """
  with open(labelmap, encoding="utf-8") as f:
    labels = [row["name"] for row in csv.DictReader(f)]
  lines = ["taxon_id\tancestry\trank_level\trank\tname\tactive",
           f"{ROOT}\t\t100\tstateofmatter\tLife\ttrue",
           f"{KINGDOM}\t{ROOT}\t70\tkingdom\tFungi\ttrue"]
  taxon_of = {}
  families, genera = set(), set()
  for i, label in enumerate(labels):
    family, genus = 1000 + i // 64, 10000 + i // 8
    if family not in families:
      families.add(family)
      lines.append(f"{family}\t{ROOT}/{KINGDOM}\t30\tfamily\t"
                   f"Familia{family}\ttrue")
    if genus not in genera:
      genera.add(genus)
      lines.append(f"{genus}\t{ROOT}/{KINGDOM}/{family}\t20\tgenus\t"
                   f"Genus{genus}\ttrue")
    if i < unmatched:
      continue
    taxon_of[i] = 100000 + i
    lines.append(f"{100000 + i}\t{ROOT}/{KINGDOM}/{family}/{genus}\t10\t"
                 f"species\t{label}\ttrue")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return labels, taxon_of
