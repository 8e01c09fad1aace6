"""natvision-evaluate: recall of each model against a label column.

    natvision-evaluate --output_dir OUT --label_column species \\
        [--models a,b] [--k 1,5] [--taxa taxa.csv] [--queries 10000]

reads the committed tables (plain or ``snapshot_date=`` partitions, with
their carried columns), prints one line per model (and rank) and writes
``OUT/evaluation.json``.

Classifiers: Recall@k is the share of photos whose true label is among the
top k labels the job stored (k at most the run's ``--top_k``).  A text label
matches a labelmap name case-insensitively with runs of whitespace collapsed;
an integer label column holds labelmap ids.  Photos whose label is not in
the labelmap are skipped, and counted per label.

Embedders: Recall@k in the metric-learning sense: a photo counts when at
least one of its k nearest neighbours (cosine similarity, the photo itself
left out) has its label.  Candidates and queries are the photos whose
normalised label occurs at least twice; the others are skipped.  The search
is exact (FAISS, inner product of unit vectors).  ``--queries N`` draws N
queries at random (seeded, recorded) and searches them against all the
candidates, for tables too large for an all-pairs search.

With ``--taxa`` (an iNaturalist taxa table: taxon_id, ancestry, rank, name)
the label column holds taxon ids, and the figures are also given at genus
and family rank: a prediction (or neighbour) counts at a rank when its
ancestor at that rank is the photo's.  Classifier label names are matched to
taxa by name.  At a rank, photos whose taxon has no ancestor of that rank
are left out, and for embedders the candidates are the photos whose
ancestor at that rank occurs at least twice.

Macro figures average the per-label recalls over the labels evaluated.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import io
import json
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

import transforms
from transforms import console
from transforms import extras
from transforms import helptext
from transforms import models as models_lib
from tools import tables as tables_lib
from tools.search import unit_rows

EVALUATION_FILE = "evaluation.json"
DEFAULT_K = (1, 5)
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
# Taxa.


@dataclasses.dataclass
class Taxa:
  """An iNaturalist taxa table, indexed for rank and name look-ups.

  Attributes:
    rank: taxon id -> rank (``species``, ``genus``, ...).
    name: taxon id -> scientific name.
    ancestors: taxon id -> ancestor ids, root first.
  """

  rank: Dict[int, str]
  name: Dict[int, str]
  ancestors: Dict[int, Tuple[int, ...]]

  def __post_init__(self):
    self._by_name: Dict[str, List[int]] = collections.defaultdict(list)
    for taxon, name in self.name.items():
      key = normalize_label(name)
      if key:
        self._by_name[key].append(taxon)

  def ancestor_at(self, taxon: int, rank: str) -> Optional[int]:
    """The taxon itself or its ancestor of ``rank``; None when there is none."""
    if self.rank.get(taxon) == rank:
      return taxon
    for ancestor in reversed(self.ancestors.get(taxon, ())):
      if self.rank.get(ancestor) == rank:
        return ancestor
    return None

  def ids_named(self, name) -> List[int]:
    return list(self._by_name.get(normalize_label(name) or "", ()))


def read_taxa(path: str) -> Taxa:
  """Reads a taxa table: tab-separated text (optionally .gz) or Parquet.

  Raises:
    EvaluationError: unreadable, or without taxon_id, ancestry, rank, name.
  """
  import pyarrow.csv as pa_csv  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  needed = ["taxon_id", "ancestry", "rank", "name"]
  try:
    with FileSystems.open(path) as f:
      data = f.read()
    if path.lower().endswith(".parquet"):
      table = pq.read_table(io.BytesIO(data))
    else:
      table = pa_csv.read_csv(
          io.BytesIO(data),
          parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
          convert_options=pa_csv.ConvertOptions(
              column_types={"taxon_id": pa.int64(), "ancestry": pa.string(),
                            "rank": pa.string(), "name": pa.string()},
              include_columns=needed))
  except Exception as e:  # noqa: BLE001 - storage and parse errors alike
    raise EvaluationError(f"--taxa {path} cannot be read as a tab-separated "
                          f"taxa table with columns {', '.join(needed)}: "
                          f"{e}") from e
  missing = [c for c in needed if c not in table.column_names]
  if missing:
    raise EvaluationError(f"--taxa {path} has no column(s) "
                          f"{', '.join(missing)}")
  rank, name, ancestors = {}, {}, {}
  for row in table.select(needed).to_pylist():
    if row["taxon_id"] is None:
      continue
    taxon = int(row["taxon_id"])
    rank[taxon] = (row["rank"] or "").strip().lower()
    name[taxon] = row["name"] or ""
    ancestors[taxon] = tuple(int(a) for a in (row["ancestry"] or "").split("/")
                             if a.strip())
  return Taxa(rank=rank, name=name, ancestors=ancestors)


def _taxon_id(value) -> Optional[int]:
  if value is None:
    return None
  try:
    return int(str(value).strip())
  except ValueError:
    return None


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
                        taxa: Optional[Taxa] = None) -> dict:
  """Recall@k of stored top-k predictions against a label column.

  Args:
    table: rows of a predictions table, with ``top_k_label_ids`` and the
      label column.
    label_column: the true label: labelmap names (text), labelmap ids
      (an integer column) or, with ``taxa``, taxon ids.
    labelmap: the classifier's class names, indexed by id.
    ks: the k values; those above the stored top-k are reported under
      ``k_unavailable``.
    taxa: a taxa table; the label column then holds taxon ids.

  Returns:
    The model's entry of evaluation.json (without ``kind`` and
    ``label_column``).
  """
  column = _label_column(table, label_column)
  integer = pa.types.is_integer(column.type)
  values = column.to_pylist()
  top = table.column("top_k_label_ids").to_pylist()
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


# --------------------------------------------------------------------------
# The command.


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """The flags of natvision-evaluate, checked."""

  output_dir: str
  label_column: str
  models: Tuple[str, ...] = ()
  ks: Tuple[int, ...] = DEFAULT_K
  taxa: Optional[str] = None
  queries: Optional[int] = None
  seed: int = 0
  labelmaps: Tuple[Tuple[str, str], ...] = ()
  write: bool = True

  def __post_init__(self):
    if not self.output_dir:
      raise EvaluationError("--output_dir is required")
    if not self.label_column:
      raise EvaluationError("--label_column is required (a carried column "
                            "holding the true label)")
    if not self.ks or any(k < 1 for k in self.ks):
      raise EvaluationError("--k takes positive integers, e.g. --k 1,5")
    if self.queries is not None and self.queries < 1:
      raise EvaluationError("--queries must be at least 1")


def _labelmap_for(table: tables_lib.ModelTable,
                  overrides: Dict[str, str]) -> List[str]:
  path = overrides.get(table.name) or table.model_info.get("labelmap")
  if not path:
    raise EvaluationError(
        f"{table.name}: the table's metadata names no labelmap; pass "
        f"--labelmap {table.name}=PATH")
  try:
    return models_lib.read_labelmap(path)
  except models_lib.ModelError as e:
    raise EvaluationError(
        f"{table.name}: {e}; pass --labelmap {table.name}=PATH") from e


def evaluate(config: EvaluateConfig) -> dict:
  """Evaluates every chosen model; writes OUT/evaluation.json.

  Returns:
    The evaluation (what evaluation.json holds).

  Raises:
    EvaluationError: no tables, an unknown model, a missing label column
      or labelmap.
  """
  found = tables_lib.find_models(config.output_dir)
  if not found:
    raise EvaluationError(f"no embeddings or predictions tables under "
                          f"{config.output_dir}")
  names = list(config.models) or list(found)
  unknown = [n for n in names if n not in found]
  if unknown:
    raise EvaluationError(f"--models: no table of {', '.join(unknown)} under "
                          f"{config.output_dir} (found {', '.join(found)})")
  taxa = read_taxa(config.taxa) if config.taxa else None
  overrides = dict(config.labelmaps)
  ks = tuple(sorted(set(config.ks)))
  results = {}
  for name in names:
    table = tables_lib.open_model_table(config.output_dir, name)
    schema = table.schema()
    if config.label_column not in schema.names and (
        config.label_column != tables_lib.PARTITION_KEY):
      raise EvaluationError(
          f"{name}: no column {config.label_column!r}; the table carries "
          f"{', '.join(tables_lib.carried_columns(schema)) or 'no columns'}")
    if table.kind == models_lib.CLASSIFIER:
      rows = table.read(["top_k_label_ids", config.label_column])
      entry = evaluate_classifier(rows, config.label_column,
                                  _labelmap_for(table, overrides), ks, taxa)
    else:
      rows = table.read(["embedding", config.label_column])
      entry = evaluate_embedder(rows, config.label_column, ks, taxa,
                                config.queries, config.seed)
    results[name] = dict({"kind": table.kind,
                          "label_column": config.label_column}, **entry)
  evaluation = {
      "output_dir": config.output_dir,
      "label_column": config.label_column,
      "k": list(ks),
      "taxa": config.taxa,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "version": transforms.__version__,
      "models": results,
  }
  if config.write:
    path = FileSystems.join(config.output_dir, EVALUATION_FILE)
    with FileSystems.create(path) as f:
      f.write(json.dumps(evaluation, indent=2, sort_keys=False).encode())
  return evaluation


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def format_table(evaluation: dict) -> str:
  """The evaluation as a fixed-width text table, one line per model/rank."""
  ks = evaluation["k"]
  header = (["model", "kind", "rank", "photos", "skipped"]
            + [f"R@{k}" for k in ks] + [f"macro R@{k}" for k in ks])
  lines = []
  for name, m in evaluation["models"].items():
    blocks = [("label", m)] + list(m.get("ranks", {}).items())
    for rank, block in blocks:
      skipped = m["skipped"] if rank == "label" else block.get(
          "not_evaluated", 0)
      lines.append(
          [name, m["kind"], rank, str(block["photos"]), str(skipped)]
          + [_fmt(block["recall_at_k"].get(str(k))) for k in ks]
          + [_fmt(block["macro_recall_at_k"].get(str(k))) for k in ks])
  widths = [max(len(r[i]) for r in [header] + lines)
            for i in range(len(header))]
  out = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
  out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
  return "\n".join(line.rstrip() for line in out)


def _ints(text: str, flag: str) -> Tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise EvaluationError(f"{flag} takes comma-separated integers, got "
                          f"{text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> EvaluateConfig:
  """Parses the flags; no I/O.

  Raises:
    EvaluationError: a flag that cannot work, naming it.
  """
  args = parser().parse_args(argv)
  labelmaps = []
  for value in args.labelmap:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
      raise EvaluationError(f"--labelmap takes NAME=PATH, got {value!r}")
    labelmaps.append((name.strip(), path.strip()))
  return EvaluateConfig(
      output_dir=args.output_dir, label_column=args.label_column,
      models=tuple(n.strip() for n in args.models.split(",") if n.strip()),
      ks=_ints(args.k, "--k"), taxa=args.taxa, queries=args.queries,
      seed=args.seed, labelmaps=tuple(labelmaps))


def parser() -> argparse.ArgumentParser:
  """natvision-evaluate's flags."""
  p = argparse.ArgumentParser(
      prog="natvision-evaluate",
      formatter_class=helptext.HelpFormatter,
      description="Recall@k of each model's table against a label column "
      "the tables carry (from the manifest, archive or snapshot): for a "
      "classifier, whether the true label is among its top k predictions; "
      "for an embedder, whether one of a photo's k nearest other photos "
      "has the same label. With --taxa, genus and family figures too. "
      "Writes OUT/evaluation.json, which natvision-report shows.",
      epilog=helptext.epilog([
          "natvision-evaluate --output_dir out --label_column species",
          "natvision-evaluate --output_dir out --label_column taxon_id "
          "--taxa taxa.csv --k 1,5,10"]))
  p.add_argument("--output_dir", required=True,
                 help="the job's --output_dir (local or gs://)")
  p.add_argument("--label_column", required=True,
                 help="carried column with the true label (a labelmap name, "
                 "a labelmap id, or a taxon id with --taxa)")
  p.add_argument("--models", default="",
                 help="comma-separated model names (default: every table)")
  p.add_argument("--k", default=",".join(str(k) for k in DEFAULT_K),
                 help="comma-separated k values")
  p.add_argument("--taxa",
                 help="iNaturalist taxa table (taxon_id, ancestry, rank, "
                 "name; tab-separated): adds genus and family figures")
  p.add_argument("--queries", type=int,
                 help="embedders: evaluate this many random queries against "
                 "all photos (for very large tables)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the --queries draw")
  p.add_argument("--labelmap", action="append", default=[],
                 metavar="NAME=PATH",
                 help="labelmap of a classifier, instead of the one the "
                 "table's metadata names")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  console.configure_logging()  # the jobs' quiet console
  try:
    config = parse_args(argv)
    status = extras.check_command("tools", "natvision-evaluate")
    if status is not None:
      return status
    evaluation = evaluate(config)
  except (EvaluationError, tables_lib.TableError) as e:
    print(f"natvision-evaluate: error: {e}", file=sys.stderr)
    return 2
  print(format_table(evaluation))
  for name, m in evaluation["models"].items():
    for k, why in m.get("k_unavailable", {}).items():
      print(f"  {name}: no Recall@{k}: {why}")
    if m["skipped_labels"]:
      shown = ", ".join(f"{label} ({n})" for label, n in
                        list(m["skipped_labels"].items())[:5])
      more = len(m["skipped_labels"]) - 5
      print(f"  {name}: skipped {m['skipped']} photo(s): {shown}"
            + (f" and {more} more label(s)" if more > 0 else ""))
  print(f"written to {FileSystems.join(config.output_dir, EVALUATION_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
