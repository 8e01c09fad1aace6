"""Recall@k of a model's table against a label column (natvision-evaluate).

Classifiers: the share of photos whose true label is among the stored top
k labels.  Embedders: Recall@k in the metric-learning sense (a photo counts
when one of its k nearest neighbours by cosine similarity, itself left out,
has its label), searched exactly with FAISS.  With a taxonomy
(``transforms.taxonomy.Taxa``) the figures are also given at genus and
family rank.  tools/evaluate.py describes the figures and is the command.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pyarrow as pa

from natvision.transforms.taxonomy import Taxa
from natvision.tools.search import unit_rows

RANKS = ("genus", "family")
NO_LABEL = "(no label)"
QUERY_CHUNK = 4096


class EvaluationError(ValueError):
  """Flags or tables that cannot be evaluated; the message says the fix."""


def _label_column(table: pa.Table, label_column: str) -> pa.ChunkedArray:
  """The table's label column.

  Raises:
    EvaluationError: the table has no such column (the message lists them).
  """
  if label_column not in table.column_names:
    raise EvaluationError(f"no column {label_column!r} in the table (columns: "
                          f"{', '.join(table.column_names)})")
  return table.column(label_column)


def normalize_label(value) -> Optional[str]:
  """Case-folded text with runs of whitespace collapsed; None when empty."""
  if value is None:
    return None
  text = " ".join(str(value).split()).casefold()
  return text or None


# --------------------------------------------------------------------------
# Figures.


def _recall_block(keys: Sequence, hits: Dict[int, np.ndarray],
                  display: Dict, extra_per_label: Optional[Dict] = None
                  ) -> dict:
  """Recall@k, macro Recall@k and per-label rows from per-photo hits.

  Args:
    keys: the label key of each evaluated photo.
    hits: k -> bool array, one entry per evaluated photo.
    display: label key -> the label as shown in the JSON.
    extra_per_label: label key -> extra fields for its row.

  Returns:
    {"photos", "recall_at_k", "macro_recall_at_k", "per_label"}.
  """
  keys = list(keys)
  by_label: Dict = collections.defaultdict(list)
  for i, key in enumerate(keys):
    by_label[key].append(i)
  order = sorted(by_label, key=lambda k: (-len(by_label[k]), str(display[k])))
  per_label = []
  for key in order:
    rows = np.array(by_label[key])
    row = {"label": display[key], "photos": len(rows),
           "recall_at_k": {str(k): float(h[rows].mean())
                           for k, h in hits.items()}}
    row.update((extra_per_label or {}).get(key, {}))
    per_label.append(row)
  return {
      "photos": len(keys),
      "recall_at_k": {str(k): float(h.mean()) if len(keys) else None
                      for k, h in hits.items()},
      "macro_recall_at_k": {
          str(k): (float(np.mean([r["recall_at_k"][str(k)]
                                  for r in per_label])) if per_label else None)
          for k in hits},
      "per_label": per_label,
  }


def _shown(value):
  """A label value as JSON shows it: ints stay ints, the rest text."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  return str(value)


def evaluate_classifier(table: pa.Table, label_column: str,
                        labelmap: Sequence[str], ks: Sequence[int],
                        taxa: Optional[Taxa] = None,
                        top_column: str = "top_k_label_ids") -> dict:
  """Recall@k of stored top-k predictions against a label column.

  Args:
    table: rows of a predictions table, with ``top_column`` and the
      label column.
    label_column: the true label: labelmap names (text), labelmap ids
      (an integer column) or, with ``taxa``, taxon ids.
    labelmap: the classifier's class names, indexed by id.
    ks: the k values; those above the stored top-k are reported under
      ``k_unavailable``.
    taxa: a taxa table; the label column then holds taxon ids.
    top_column: the stored top-k label ids evaluated: the image-only
      ``top_k_label_ids``, or ``prior_top_k_label_ids`` of a ``--prior``
      run.

  Returns:
    The model's entry of evaluation.json (without ``kind`` and
    ``label_column``).
  """
  column = _label_column(table, label_column)
  integer = pa.types.is_integer(column.type)
  values = column.to_pylist()
  top = table.column(top_column).to_pylist()
  stored_k = min((len(t) for t in top if t is not None), default=0)
  usable_k = [k for k in ks if k <= stored_k]
  by_name: Dict[str, Set[int]] = collections.defaultdict(set)
  for i, name in enumerate(labelmap):
    by_name[normalize_label(name) or ""].add(i)
  label_taxa: Dict[int, Set[int]] = {}
  if taxa is not None:
    label_taxa = {i: set(taxa.ids_named(name)) for i, name in
                  enumerate(labelmap)}

  skipped: collections.Counter = collections.Counter()
  keys, truths, tops, taxon_of = [], [], [], []
  display: Dict = {}
  for value, predicted in zip(values, top):
    if taxa is not None:
      taxon = _taxon_id(value)
      ids = (by_name.get(normalize_label(taxa.name.get(taxon)) or "", set())
             if taxon is not None else set())
      key, shown = taxon, taxon
    elif integer:
      ids = {int(value)} if value is not None and 0 <= value < len(
          labelmap) else set()
      key, shown = (int(value) if value is not None else None), value
    else:
      key = normalize_label(value)
      ids = by_name.get(key or "", set())
      shown = labelmap[min(ids)] if ids else value
    if not ids or predicted is None:
      skipped[NO_LABEL if normalize_label(value) is None else str(value)] += 1
      continue
    keys.append(key)
    display.setdefault(key, _shown(shown))
    truths.append(ids)
    tops.append(list(predicted))
    taxon_of.append(key if taxa is not None else None)

  hits = {k: np.array([bool(set(t[:k]) & ids) for t, ids in zip(tops, truths)],
                      bool) for k in usable_k}
  extra = ({key: {"name": taxa.name.get(key, "")} for key in display}
           if taxa is not None else None)
  result = _recall_block(keys, hits, display, extra)
  result.update({"skipped": sum(skipped.values()),
                 "skipped_labels": dict(skipped.most_common()),
                 "stored_top_k": stored_k})
  unavailable = [k for k in ks if k > stored_k]
  if unavailable:
    result["k_unavailable"] = {
        str(k): f"the table keeps the top {stored_k} labels per photo (the "
                f"run's --top_k); rerun the job with --top_k {k} or more"
        for k in unavailable}
  if taxa is not None:
    result["ranks"] = {}
    for rank in RANKS:
      predicted_at = {
          i: {taxa.ancestor_at(t, rank) for t in ids} - {None}
          for i, ids in label_taxa.items()}
      rows = [(j, taxa.ancestor_at(taxon_of[j], rank))
              for j in range(len(keys))]
      rows = [(j, a) for j, a in rows if a is not None]
      rank_hits = {
          k: np.array([any(a in predicted_at.get(i, ()) for i in tops[j][:k])
                       for j, a in rows], bool)
          for k in usable_k}
      rank_keys = [a for _, a in rows]
      block = _recall_block(
          rank_keys, rank_hits, {a: a for a in rank_keys},
          {a: {"name": taxa.name.get(a, "")} for a in rank_keys})
      block["not_evaluated"] = len(keys) - len(rows)
      result["ranks"][rank] = block
  return result


def nearest_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int
                       ) -> np.ndarray:
  """Exact cosine k-nearest neighbours among ``vectors``, self left out.

  Args:
    vectors: unit rows, float32 ``[n, d]``.
    queries: row indices into ``vectors`` to search for, ``[q]``.
    k: neighbours per query, at most ``n - 1``.

  Returns:
    int64 ``[q, k]`` row indices, most similar first, never the query row.
  """
  import faiss  # pylint: disable=import-outside-toplevel
  index = faiss.IndexFlatIP(vectors.shape[1])
  index.add(vectors)
  out = np.empty((len(queries), k), np.int64)
  for start in range(0, len(queries), QUERY_CHUNK):
    chunk = np.asarray(queries[start:start + QUERY_CHUNK])
    _, found = index.search(vectors[chunk], k + 1)
    for row, (query, ids) in enumerate(zip(chunk, found)):
      ids = [i for i in ids if i != query and i >= 0][:k]
      out[start + row] = ids
  return out


def _knn_block(keys: List, vectors: np.ndarray, ks: Sequence[int],
               display: Dict, queries: Optional[int], seed: int,
               extra: Optional[Dict] = None) -> Tuple[dict, np.ndarray]:
  """Recall@k of k-NN among the photos whose key occurs at least twice.

  Args:
    keys: label key per photo.
    vectors: float ``[n, d]`` embeddings, one row per key.
    ks, display, extra: as for ``_recall_block``.
    queries, seed: evaluate this many seeded random queries (None: all).

  Returns:
    (figures, keep): keep is a bool ``[n]``, True for the candidates.
  """
  counts = collections.Counter(keys)
  keep = np.array([counts[key] >= 2 for key in keys], bool)
  candidates = np.flatnonzero(keep)
  cand_keys = np.array([keys[i] for i in candidates], dtype=object)
  usable = [k for k in ks if k <= len(candidates) - 1]
  query_rows = np.arange(len(candidates))
  sampled = None
  if queries is not None and queries < len(candidates):
    rng = np.random.default_rng(seed)
    query_rows = np.sort(rng.choice(len(candidates), queries, replace=False))
    sampled = {"n": int(queries), "seed": seed,
               "candidates": int(len(candidates))}
  hits = {}
  if usable and len(query_rows):
    neighbours = nearest_neighbours(unit_rows(vectors[candidates]), query_rows,
                                    max(usable))
    same = cand_keys[neighbours] == cand_keys[query_rows][:, None]
    hits = {k: same[:, :k].any(axis=1) for k in usable}
  block = _recall_block([cand_keys[i] for i in query_rows], hits, display,
                        extra)
  block["candidates"] = int(len(candidates))
  if sampled:
    block["queries"] = sampled
  unavailable = [k for k in ks if k not in usable]
  if unavailable:
    block["k_unavailable"] = {
        str(k): f"only {len(candidates)} photo(s) can be neighbours"
        for k in unavailable}
  return block, keep


def evaluate_embedder(table: pa.Table, label_column: str, ks: Sequence[int],
                      taxa: Optional[Taxa] = None,
                      queries: Optional[int] = None, seed: int = 0) -> dict:
  """Recall@k of exact cosine k-NN against a label column.

  Args:
    table: rows of an embeddings table, with ``embedding`` and the label
      column.
    label_column: the true label (text or ids; taxon ids with ``taxa``).
    ks: the k values.
    taxa: a taxa table, for the genus and family figures.
    queries: evaluate this many random queries instead of every photo.
    seed: seeds the choice of queries.

  Returns:
    The model's entry of evaluation.json (without ``kind`` and
    ``label_column``).
  """
  values = _label_column(table, label_column).to_pylist()
  embedding = table.column("embedding").combine_chunks()
  width = embedding.type.list_size
  vectors = embedding.flatten().to_numpy(zero_copy_only=False).reshape(
      -1, width)
  skipped: collections.Counter = collections.Counter()
  rows, keys, display = [], [], {}
  for i, value in enumerate(values):
    key = _taxon_id(value) if taxa is not None else normalize_label(value)
    if key is None:
      skipped[NO_LABEL if normalize_label(value) is None else str(value)] += 1
      continue
    rows.append(i)
    keys.append(key)
    display.setdefault(key, _shown(key if taxa is not None else value))
  rows = np.array(rows, np.int64)
  extra = ({key: {"name": taxa.name.get(key, "")} for key in display}
           if taxa is not None else None)
  result, kept = _knn_block(keys, vectors[rows], ks, display, queries, seed,
                            extra)
  for key, keep in zip(keys, kept):
    if not keep:
      skipped[str(display[key])] += 1
  result.update({"skipped": sum(skipped.values()),
                 "skipped_labels": dict(skipped.most_common())})
  if taxa is not None:
    result["ranks"] = {}
    for rank in RANKS:
      at = [(i, taxa.ancestor_at(key, rank)) for i, key in zip(rows, keys)]
      at = [(i, a) for i, a in at if a is not None]
      rank_rows = np.array([i for i, _ in at], np.int64)
      rank_keys = [a for _, a in at]
      block, kept = _knn_block(
          rank_keys, vectors[rank_rows] if len(at) else vectors[:0], ks,
          {a: a for a in rank_keys}, queries, seed,
          {a: {"name": taxa.name.get(a, "")} for a in rank_keys})
      block["not_evaluated"] = len(rows) - int(kept.sum())
      result["ranks"][rank] = block
  return result


def _taxon_id(value) -> Optional[int]:
  if value is None:
    return None
  try:
    return int(str(value).strip())
  except ValueError:
    return None
