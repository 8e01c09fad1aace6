"""Roll-up figures of a predictions table made with ``--taxa``.

A photo's roll-up (``rollup_taxon_id``, ``rollup_rank``; see
transforms/taxonomy.py) answers at some rank, or not at all.  Against the
photo's true taxon (a label column of taxon ids) and a taxonomy:

* ``share_by_rank``: the share of the evaluated photos answered at each
  rank (``none`` for photos no taxon reached the threshold for);
* ``accuracy_by_rank``: among the photos answered at a rank, the share
  whose answer is right: the true taxon itself or one of its ancestors
  (an answer of "Amanita" is right for a photo of Amanita muscaria);
* ``accuracy``: the same over every answered photo.

Photos whose true taxon is missing or not in the taxonomy are skipped and
counted.  This is the trade-off ``--rollup_threshold`` sets: a higher
threshold answers at coarser ranks, and more often rightly.

A natvision-label table (``taxon_id``, ``rank`` per ``image_id``) is
scored the same way (``evaluate_labels``), against the true taxa of the
embeddings table it labelled, joined by image id.
"""

from __future__ import annotations

import collections
from typing import Optional

import pyarrow as pa

from natvision.transforms.taxonomy import Taxa

NOT_ANSWERED = "none"
COLUMNS = ("rollup_taxon_id", "rollup_rank")


def evaluate_rollup(table: pa.Table, label_column: str,
                    taxa: Taxa) -> Optional[dict]:
  """The roll-up figures (module docstring); None without roll-up columns.

  Args:
    table: rows of a predictions table with ``rollup_taxon_id``,
      ``rollup_rank`` and the label column.
    label_column: the true taxon ids.
    taxa: the taxonomy the truth is placed in.
  """
  if any(c not in table.column_names for c in COLUMNS):
    return None
  truths = table.column(label_column).to_pylist()
  answers = table.column("rollup_taxon_id").to_pylist()
  ranks = table.column("rollup_rank").to_pylist()
  answered: collections.Counter = collections.Counter()
  right: collections.Counter = collections.Counter()
  photos = skipped = 0
  for truth, answer, rank in zip(truths, answers, ranks):
    try:
      truth = int(str(truth).strip()) if truth is not None else None
    except ValueError:
      truth = None
    if truth is None or truth not in taxa.rank:
      skipped += 1
      continue
    photos += 1
    if answer is None:
      answered[NOT_ANSWERED] += 1
      continue
    rank = rank or taxa.rank.get(answer, "") or "(no rank)"
    answered[rank] += 1
    if answer == truth or answer in taxa.ancestors(truth):
      right[rank] += 1
  order = sorted(answered, key=lambda r: (r == NOT_ANSWERED, -answered[r], r))
  total_answered = photos - answered[NOT_ANSWERED]
  return {
      "photos": photos,
      "skipped": skipped,
      "answered": total_answered,
      "share_by_rank": {r: answered[r] / photos for r in order},
      "accuracy_by_rank": {r: right[r] / answered[r] for r in order
                           if r != NOT_ANSWERED},
      "accuracy": (sum(right.values()) / total_answered
                   if total_answered else None),
  }


def evaluate_labels(labels: pa.Table, truth: pa.Table, label_column: str,
                    taxa: Taxa) -> dict:
  """The roll-up figures of a natvision-label table.

  Args:
    labels: ``image_id``, ``taxon_id``, ``rank`` (tools/label_vote.py).
    truth: ``image_id`` and the label column (true taxon ids) of the
      labelled embeddings table.
    label_column: the truth's column.
    taxa: the taxonomy.

  Returns:
    ``evaluate_rollup``'s figures over the photos in both tables, with
    ``unmatched``: label rows whose image id the truth does not have.
  """
  answers = labels.select(["image_id", "taxon_id", "rank"]).rename_columns(
      ["image_id"] + list(COLUMNS))
  truth = truth.select(["image_id", label_column])
  joined = answers.join(truth, "image_id", join_type="inner")
  figures = evaluate_rollup(joined, label_column, taxa)
  figures["unmatched"] = answers.num_rows - joined.num_rows
  return figures
