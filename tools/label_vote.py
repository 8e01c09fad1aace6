"""The vote of a photo's nearest reference photos, rolled up to a taxon.

natvision-label (tools/label.py) finds, for each photo of one run, its k
nearest photos in a reference run whose rows carry taxon ids, and this
module turns those neighbours into an answer:

* A neighbour's weight is its cosine similarity to the photo, clipped at
  0.  Cosine similarity is what the index ranks by (tools/index.py: inner
  products of unit vectors), so the weight orders neighbours exactly as
  the search did; a neighbour at zero or negative similarity points away
  from the photo and is no evidence for its taxon, so it weighs nothing
  rather than counting against it.
* Neighbours whose reference row has no taxon id (or that the search did
  not fill, fewer than k rows) weigh nothing either.  ``neighbours`` counts
  those with positive weight.
* The weights, divided by their sum, are a distribution over the
  reference taxa (several neighbours of one taxon add up).  It is rolled up
  exactly as a classifier's probabilities are (transforms/taxonomy.py
  ``RollUp``): the score of a taxon is the summed weight of the neighbours
  at it or under it, and the answer is the deepest taxon whose score
  reaches ``--rollup_threshold``.  A reference taxon id the taxonomy does
  not hold keeps its weight in the denominator but adds to no taxon.
* A photo with no neighbour of positive weight gets a null answer with
  ``neighbours`` 0.

The distribution is built as a sparse ``[n, T]`` matrix over the T
distinct reference taxa, so a batch costs memory in proportion to its
n x k neighbours and the taxa they touch, not to the taxonomy's size.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from natvision.transforms import taxonomy

# The label table's columns, in order.
SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("taxon_id", pa.int64()),
    ("name", pa.string()),
    ("rank", pa.string()),
    ("score", pa.float64()),
    ("neighbours", pa.int32()),
    ("top_neighbour_id", pa.string()),
])


@dataclasses.dataclass
class Reference:
  """What the vote needs of the reference rows, in index order.

  Attributes:
    label_of_row: int32 ``[N]``, the column of each reference row's taxon
      in ``label_taxa`` (-1 for a row without a taxon id).
    image_ids: the reference rows' image ids (Arrow, ``[N]``; may be
      memory-mapped).
    label_taxa: the reference's distinct taxon ids as the labels of a
      roll-up (``taxonomy.taxa_as_labels``).
  """

  label_of_row: np.ndarray
  image_ids: object  # pa.Array or pa.ChunkedArray
  label_taxa: taxonomy.LabelTaxa

  @classmethod
  def from_columns(cls, image_ids, taxon_ids: np.ndarray,
                   has_taxon: np.ndarray, taxa: taxonomy.Taxa,
                   threshold: float) -> "Reference":
    """From the reference's image ids, taxon ids (int64 ``[N]``) and a mask
    of the rows that have one."""
    distinct, inverse = np.unique(taxon_ids[has_taxon], return_inverse=True)
    label_of_row = np.full(len(taxon_ids), -1, np.int32)
    label_of_row[has_taxon] = inverse
    return cls(label_of_row, image_ids,
               taxonomy.taxa_as_labels(distinct.tolist(), taxa, threshold))


class Vote:
  """Labels batches of photos from their neighbours (module docstring)."""

  def __init__(self, reference: Reference):
    self.reference = reference
    self._rollup = taxonomy.RollUp(reference.label_taxa)
    # The roll-up's nodes as arrays, indexed by RollUp's node numbers.
    taxa = reference.label_taxa
    self._node_ids = np.asarray(taxa.node_ids or (0,), np.int64)
    self._names = np.asarray(taxa.node_names or ("",), object)
    self._ranks = np.asarray(taxa.node_ranks or ("",), object)

  def weights(self, scores: np.ndarray, rows: np.ndarray
              ) -> tuple:
    """(weights float64 ``[n, k]``, label columns int64 ``[n, k]``).

    Args:
      scores: cosine similarities ``[n, k]`` from the index, best first.
      rows: reference rows ``[n, k]``; -1 where the search found fewer.
    """
    rows = np.asarray(rows, np.int64)
    labels = np.where(rows >= 0,
                      self.reference.label_of_row[np.maximum(rows, 0)], -1)
    weights = np.clip(np.asarray(scores, np.float64), 0.0, None)
    weights = np.where((labels >= 0) & np.isfinite(weights), weights, 0.0)
    return weights, labels

  def __call__(self, image_ids: Sequence[str], uris: Sequence[Optional[str]],
               scores: np.ndarray, rows: np.ndarray) -> pa.RecordBatch:
    """The label rows of one batch of photos, in ``SCHEMA``.

    Args:
      image_ids, uris: the photos, ``[n]``.
      scores, rows: their neighbours (``weights``).
    """
    import scipy.sparse  # pylint: disable=import-outside-toplevel
    n = len(image_ids)
    weights, labels = self.weights(scores, rows)
    positive = weights > 0
    total = weights.sum(axis=1)
    share = np.divide(weights, total[:, None], out=np.zeros_like(weights),
                      where=total[:, None] > 0)
    r, c = np.nonzero(positive)
    # Duplicate (photo, taxon) entries add up when the matrix is built.
    distribution = scipy.sparse.csr_matrix(
        (share[r, c], (r, labels[r, c])),
        shape=(n, len(self.reference.label_taxa.label_taxon)))
    rolled = self._rollup.sparse(distribution)
    found = rolled.node >= 0
    node = np.maximum(rolled.node, 0)
    node_ids, names, ranks = self._node_ids, self._names, self._ranks
    # The most similar neighbour that voted (scores come best first).
    first = np.argmax(positive, axis=1)
    top_rows = np.asarray(rows, np.int64)[np.arange(n), first]
    has_top = positive.any(axis=1)
    top_ids = self.reference.image_ids.take(
        pa.array(np.where(has_top, top_rows, 0))) if n else pa.array(
            [], pa.string())
    top_ids = pa.array([v if h else None for v, h in
                        zip(top_ids.to_pylist(), has_top)], pa.string())
    return pa.RecordBatch.from_arrays([
        pa.array(list(image_ids), pa.string()),
        pa.array(list(uris), pa.string()),
        pa.array(node_ids[node], pa.int64(), mask=~found),
        pa.array(names[node], pa.string(), mask=~found),
        pa.array(ranks[node], pa.string(), mask=~found),
        pa.array(rolled.score, pa.float64(), mask=~found),
        pa.array(positive.sum(axis=1).astype(np.int32), pa.int32()),
        top_ids,
    ], schema=SCHEMA)
