"""A classifier's labels as taxa, and the roll-up of its scores to ancestors.

``--taxa PATH`` names a taxonomy: an iNaturalist taxa table (columns
``taxon_id``, ``ancestry``, ``rank``, ``name``, and ``active`` when there;
the table of an iNaturalist open-data snapshot, tab-separated, optionally
gzipped, or Parquet) or a GBIF backbone ``Taxon.tsv`` (Darwin Core Taxon
terms ``taxonID``, ``parentNameUsageID``, ``taxonRank``, ``scientificName``,
``canonicalName``, ``taxonomicStatus``, and ``acceptedNameUsageID`` when
there).  The launcher reads it once (``attach``), matches each label of each
classifier's labelmap to a taxon by its normalised scientific name
(``normalize_name``), and hands every classifier a ``LabelTaxa``: only the
labels' taxa and their ancestors, small enough to travel with the model to
the workers.  More unmatched labels than ``--max_unmatched_labels`` (a
fraction of the labelmap) is a configuration error (exit 2), raised before
the pipeline starts.

Roll-up (docs/taxonomy.md): for photo ``i`` with the full probability
vector ``p_i`` over the ``T`` labels, the score of taxon ``a`` is

    s_i(a) = sum of p_i(l) over the labels l whose taxon is a or lies under a

computed for a batch as one product ``P [n, T] @ M [T, A]`` with the sparse
0/1 matrix ``M[l, a] = 1`` when ``a`` is label ``l``'s taxon or one of its
ancestors (``LabelTaxa.matrix``, built once per worker process).  The photo
rolls up to the deepest taxon (the longest ancestry) with
``s_i(a) >= --rollup_threshold``; between two of the same depth (possible
only with a threshold of 0.5 or less) the higher score wins, then the lower
taxon id.  A photo whose best label's taxon reaches the threshold rolls up
to that taxon.  Unmatched labels belong to no taxon: their probability is
in no sum, so a photo may reach no taxon at all (its roll-up is null).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import json
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from natvision.transforms import config

DEFAULT_ROLLUP_THRESHOLD = 0.8
DEFAULT_MAX_UNMATCHED_LABELS = 0.05

INATURALIST = "inaturalist"
GBIF = "gbif"
INATURALIST_COLUMNS = ("taxon_id", "ancestry", "rank", "name")
GBIF_COLUMNS = ("taxonID", "parentNameUsageID", "taxonRank",
                "scientificName", "canonicalName", "taxonomicStatus")
# GBIF statuses of a name that is a taxon (the rest are synonyms).
GBIF_ACCEPTED = ("accepted", "doubtful")


class TaxonomyError(config.ConfigError):
  """A --taxa table that cannot be read, or labels it does not cover."""


# --------------------------------------------------------------------------
# Names.

# Infraspecific rank markers and open nomenclature: dropped, since
# iNaturalist writes "Amanita muscaria flavivolvata" where GBIF writes
# "Amanita muscaria var. flavivolvata".
_MARKERS = frozenset({
    "var.", "var", "subsp.", "subsp", "ssp.", "ssp", "f.", "fo.", "forma",
    "subvar.", "subf.", "sp.", "spp.", "agg.", "s.l.", "s.str."})
# Lowercase particles that begin an author string when a capitalised word
# follows them ("de Candolle", "van der Byl", "ex Fr.").
_PARTICLES = frozenset({
    "de", "da", "del", "della", "der", "den", "di", "du", "la", "le", "van",
    "von", "ex", "et", "in", "emend.", "sensu", "non", "nom.", "auct."})
_HYBRID = re.compile(r"[\u00d7\u2715\u2a2f]")  # multiplication signs
_EPITHET = re.compile(r"^[^\W\d_]+(?:-[^\W\d_]+)*$")


def normalize_name(name) -> Optional[str]:
  """A scientific name reduced to what matches across sources.

  Unicode NFKC, case folded, runs of whitespace collapsed, hybrid signs
  (``×`` and a standalone ``x``) and rank markers (``var.``, ``subsp.``,
  ``f.``, ``sp.``) dropped, and the author string stripped: the name ends
  at the first word (after the genus) that is capitalised (not all
  capitals), parenthesised, holds a full stop or other non-letters, or is a
  particle (``de``, ``van``, ``ex``) before a capitalised word.  A word of
  digits alone is kept (placeholder names, ``"Russula sp. 2"``).  ``"Amanita muscaria (L.) Lam."`` and
  ``"amanita  MUSCARIA"`` both give ``"amanita muscaria"``;
  ``"× Cupressocyparis leylandii"`` gives ``"cupressocyparis leylandii"``.

  Returns:
    The normalised name; None when nothing is left.
  """
  if name is None:
    return None
  text = _HYBRID.sub(" ", unicodedata.normalize("NFKC", str(name)))
  tokens = text.replace("_", " ").split()
  kept: List[str] = []
  for i, token in enumerate(tokens):
    low = token.casefold()
    if low in _MARKERS or (low == "x" and kept):
      continue
    if kept:
      following = tokens[i + 1] if i + 1 < len(tokens) else ""
      if token.isdigit():  # a placeholder's number ("Russula sp. 2")
        kept.append(low)
        continue
      if ((token[:1].isupper() and not token.isupper())
          or not _EPITHET.match(token)
          or (low in _PARTICLES and following[:1].isupper())):
        break
    elif not _EPITHET.match(token):
      if not token.strip("\"'()[]"):
        continue
      token = token.strip("\"'()[]")
      low = token.casefold()
    kept.append(low)
  return " ".join(kept) or None


# --------------------------------------------------------------------------
# Taxa tables.


@dataclasses.dataclass
class Taxa:
  """A taxonomy, indexed by id and by normalised name.

  Attributes:
    kind: ``inaturalist`` or ``gbif``.
    rank: taxon id -> rank, lower case (``species``, ``genus``, ...).
    name: taxon id -> scientific name (GBIF: the canonical name).
    preferred: taxon ids to prefer when names collide (iNaturalist's
      active taxa, GBIF's accepted ones).
    ancestry: iNaturalist: taxon id -> ancestor ids, root first.
    parent: GBIF: taxon id -> parent id (ancestors are walked on demand).
    synonyms: GBIF: normalised synonym name -> accepted taxon ids.
  """

  kind: str
  rank: Dict[int, str]
  name: Dict[int, str]
  preferred: frozenset = frozenset()
  ancestry: Dict[int, Tuple[int, ...]] = dataclasses.field(
      default_factory=dict)
  parent: Dict[int, int] = dataclasses.field(default_factory=dict)
  synonyms: Dict[str, List[int]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._by_name: Dict[str, List[int]] = collections.defaultdict(list)
    for taxon, name in self.name.items():
      key = normalize_name(name)
      if key:
        self._by_name[key].append(taxon)

  def ancestors(self, taxon: int) -> Tuple[int, ...]:
    """The taxon's ancestors, root first; () for a root or unknown id."""
    if self.kind == INATURALIST:
      return self.ancestry.get(taxon, ())
    chain, seen = [], {taxon}
    node = self.parent.get(taxon)
    while node is not None and node not in seen:  # a cycle ends the walk
      chain.append(node)
      seen.add(node)
      node = self.parent.get(node)
    return tuple(reversed(chain))

  def ancestor_at(self, taxon: int, rank: str) -> Optional[int]:
    """The taxon itself or its ancestor of ``rank``; None when none is."""
    if self.rank.get(taxon) == rank:
      return taxon
    for ancestor in reversed(self.ancestors(taxon)):
      if self.rank.get(ancestor) == rank:
        return ancestor
    return None

  def ids_named(self, name) -> List[int]:
    """Taxa whose normalised name is ``name``'s (GBIF: synonyms' accepted
    taxa when no accepted name matches), preferred ones first, then by id."""
    key = normalize_name(name) or ""
    ids = self._by_name.get(key) or self.synonyms.get(key) or []
    return sorted(set(ids), key=lambda t: (t not in self.preferred, t))


def _read_table(path: str, data: bytes, columns: Sequence[str]):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.csv as pa_csv  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  if path.lower().endswith(".parquet"):
    table = pq.read_table(io.BytesIO(data))
    return table.select([c for c in columns if c in table.column_names])
  header = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
  present = [c for c in columns if c in header.split("\t")]
  return pa_csv.read_csv(
      io.BytesIO(data),
      parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
      convert_options=pa_csv.ConvertOptions(
          column_types={c: pa.string() for c in present},
          include_columns=present))


def _int(value) -> Optional[int]:
  try:
    return int(str(value).strip()) if value not in (None, "") else None
  except ValueError:
    return None


def read_taxa(path: str) -> Taxa:
  """Reads an iNaturalist taxa table or a GBIF ``Taxon.tsv``.

  The format is told by the columns: iNaturalist's need ``taxon_id``,
  ``ancestry``, ``rank``, ``name``; GBIF's ``taxonID``,
  ``parentNameUsageID``, ``taxonRank``, ``scientificName``,
  ``canonicalName``, ``taxonomicStatus``.  Text tables are tab-separated
  and unquoted (both sources write them so), optionally gzipped.

  Raises:
    TaxonomyError: unreadable, or neither set of columns.
  """
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  fix = (f"--taxa takes an iNaturalist taxa table "
         f"({', '.join(INATURALIST_COLUMNS)}) or a GBIF backbone Taxon.tsv "
         f"({', '.join(GBIF_COLUMNS)})")
  try:
    with FileSystems.open(path) as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
    table = _read_table(path, data, INATURALIST_COLUMNS + ("active",)
                        + GBIF_COLUMNS + ("acceptedNameUsageID",))
  except Exception as e:  # noqa: BLE001 - storage and parse errors alike
    raise TaxonomyError(f"--taxa {path} cannot be read: {e}; {fix}") from e
  names = set(table.column_names)
  if set(INATURALIST_COLUMNS) <= names:
    return _inaturalist(table)
  if set(GBIF_COLUMNS) <= names:
    return _gbif(table)
  raise TaxonomyError(f"--taxa {path} has columns "
                      f"{', '.join(sorted(names)) or 'none'}; {fix}")


def _inaturalist(table) -> Taxa:
  rank, name, ancestry, preferred = {}, {}, {}, set()
  active = table.column("active").to_pylist() if (
      "active" in table.column_names) else [None] * table.num_rows
  for taxon, line, r, n, a in zip(
      table.column("taxon_id").to_pylist(),
      table.column("ancestry").to_pylist(),
      table.column("rank").to_pylist(), table.column("name").to_pylist(),
      active):
    taxon = _int(taxon)
    if taxon is None:
      continue
    rank[taxon] = (r or "").strip().lower()
    name[taxon] = n or ""
    ancestry[taxon] = tuple(int(x) for x in (line or "").split("/")
                            if x.strip().isdigit())
    if a is None or str(a).strip().lower() in ("true", "t", "1"):
      preferred.add(taxon)
  return Taxa(kind=INATURALIST, rank=rank, name=name,
              preferred=frozenset(preferred), ancestry=ancestry)


def _gbif(table) -> Taxa:
  rank, name, parent, preferred = {}, {}, {}, set()
  synonyms: Dict[str, List[int]] = collections.defaultdict(list)
  columns = {c: table.column(c).to_pylist() for c in table.column_names}
  accepted_of = columns.get("acceptedNameUsageID", [None] * table.num_rows)
  for i, taxon in enumerate(columns["taxonID"]):
    taxon = _int(taxon)
    if taxon is None:
      continue
    status = (columns["taxonomicStatus"][i] or "").strip().lower()
    label = columns["canonicalName"][i] or columns["scientificName"][i] or ""
    if status and not any(status.startswith(s) for s in GBIF_ACCEPTED):
      accepted = _int(accepted_of[i])
      key = normalize_name(label)
      if accepted is not None and key:
        synonyms[key].append(accepted)
      continue
    rank[taxon] = (columns["taxonRank"][i] or "").strip().lower()
    name[taxon] = label
    up = _int(columns["parentNameUsageID"][i])
    if up is not None:
      parent[taxon] = up
    if status.startswith("accepted"):
      preferred.add(taxon)
  return Taxa(kind=GBIF, rank=rank, name=name, preferred=frozenset(preferred),
              parent=parent, synonyms=dict(synonyms))


# --------------------------------------------------------------------------
# Labels as taxa.


@dataclasses.dataclass(frozen=True)
class LabelTaxa:
  """One classifier's labels as taxa: what its workers need to roll up.

  Attributes:
    label_taxon: per label id, its taxon id; None when unmatched.
    node_ids: the labels' taxa and all their ancestors, ascending ids
      (the columns of ``matrix``).
    node_names: each node's scientific name ("" when the table has no row
      for an ancestor its ancestries name).
    node_ranks: each node's rank ("" likewise).
    node_depths: each node's number of ancestors (0 for a root).
    label_nodes: per label, the indices into ``node_ids`` of its taxon and
      its ancestors (() when unmatched).
    unmatched: labels matched to no taxon, in labelmap order.
    ambiguous: labels whose name several taxa bear (the preferred, then
      lowest id was taken).
    threshold: ``--rollup_threshold``.
  """

  label_taxon: Tuple[Optional[int], ...]
  node_ids: Tuple[int, ...]
  node_names: Tuple[str, ...]
  node_ranks: Tuple[str, ...]
  node_depths: Tuple[int, ...]
  label_nodes: Tuple[Tuple[int, ...], ...]
  unmatched: Tuple[str, ...]
  ambiguous: Tuple[str, ...]
  threshold: float

  @property
  def fingerprint(self) -> str:
    """32 hex digits of what the rows depend on: each label's taxon and
    every node's id, name, rank and depth (not the whole table, so another
    copy or format of one taxonomy gives the same fingerprint)."""
    text = json.dumps([self.label_taxon, self.node_ids, self.node_names,
                       self.node_ranks, self.node_depths],
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]

  @property
  def unmatched_fraction(self) -> float:
    return len(self.unmatched) / max(len(self.label_taxon), 1)

  def matrix(self):
    """The sparse 0/1 label x node matrix, float64 CSR ``[T, A]``."""
    import scipy.sparse  # pylint: disable=import-outside-toplevel
    rows = [l for l, nodes in enumerate(self.label_nodes) for _ in nodes]
    cols = [a for nodes in self.label_nodes for a in nodes]
    return scipy.sparse.csr_matrix(
        (np.ones(len(rows)), (rows, cols)),
        shape=(len(self.label_nodes), len(self.node_ids)))

  def report(self, taxa_path: str) -> dict:
    """The model's entry of run.json's ``taxonomy``."""
    return {"taxa": taxa_path, "fingerprint": self.fingerprint,
            "rollup_threshold": self.threshold,
            "labels": len(self.label_taxon),
            "matched": len(self.label_taxon) - len(self.unmatched),
            "unmatched_fraction": round(self.unmatched_fraction, 6),
            "unmatched": list(self.unmatched),
            "ambiguous": list(self.ambiguous)}


def match_labels(labels: Sequence[str], taxa: Taxa,
                 threshold: float = DEFAULT_ROLLUP_THRESHOLD) -> LabelTaxa:
  """Matches labelmap names to taxa by normalised scientific name."""
  label_taxon: List[Optional[int]] = []
  unmatched, ambiguous = [], []
  for label in labels:
    ids = taxa.ids_named(label)
    if not ids:
      unmatched.append(label)
    elif len(ids) > 1:
      ambiguous.append(label)
    label_taxon.append(ids[0] if ids else None)
  return _label_taxa(label_taxon, taxa, threshold, unmatched, ambiguous)


def taxa_as_labels(taxon_ids: Sequence[int], taxa: Taxa,
                   threshold: float = DEFAULT_ROLLUP_THRESHOLD) -> LabelTaxa:
  """Taxon ids as the "labels" of a roll-up (label ``l`` is ``taxon_ids[l]``).

  For scores that are already over taxa, such as natvision-label's votes
  of neighbours (tools/label_vote.py).  An id the taxonomy does not hold
  is unmatched (its label's score reaches no taxon); ``unmatched`` holds
  such ids as text.
  """
  label_taxon = [int(t) if int(t) in taxa.rank else None for t in taxon_ids]
  unmatched = [str(t) for t, m in zip(taxon_ids, label_taxon) if m is None]
  return _label_taxa(label_taxon, taxa, threshold, unmatched, [])


def _label_taxa(label_taxon: List[Optional[int]], taxa: Taxa,
                threshold: float, unmatched: List[str],
                ambiguous: List[str]) -> LabelTaxa:
  chains = {t: taxa.ancestors(t) for t in label_taxon if t is not None}
  depth: Dict[int, int] = {}
  for taxon, chain in chains.items():
    for d, node in enumerate(chain + (taxon,)):
      depth.setdefault(node, d)
  node_ids = tuple(sorted(depth))
  index = {t: i for i, t in enumerate(node_ids)}
  return LabelTaxa(
      label_taxon=tuple(label_taxon), node_ids=node_ids,
      node_names=tuple(taxa.name.get(t, "") for t in node_ids),
      node_ranks=tuple(taxa.rank.get(t, "") for t in node_ids),
      node_depths=tuple(depth[t] for t in node_ids),
      label_nodes=tuple(
          () if t is None else tuple(index[a] for a in chains[t] + (t,))
          for t in label_taxon),
      unmatched=tuple(unmatched), ambiguous=tuple(ambiguous),
      threshold=float(threshold))


# --------------------------------------------------------------------------
# Roll-up.


@dataclasses.dataclass(frozen=True)
class RollUps:
  """A batch's roll-ups: ``node`` int64 ``[n]`` (index into ``node_ids``,
  -1 when no taxon reaches the threshold), ``score`` float64 ``[n]`` (NaN
  with -1)."""

  node: np.ndarray
  score: np.ndarray


class RollUp:
  """Rolls batches of probabilities up a ``LabelTaxa``; build once per
  worker process (the matrix is built here)."""

  def __init__(self, label_taxa: LabelTaxa):
    self.label_taxa = label_taxa
    self._matrix = label_taxa.matrix()
    self._depths = np.asarray(label_taxa.node_depths, np.int64)

  def sums(self, probabilities: np.ndarray) -> np.ndarray:
    """Summed scores per node, float64 ``[n, A]``, from ``[n, T]``."""
    p = np.asarray(probabilities, np.float64)
    return np.asarray(self._matrix.T.dot(p.T).T)

  def __call__(self, probabilities: np.ndarray) -> RollUps:
    """The deepest node reaching the threshold, per photo (module doc)."""
    sums = self.sums(probabilities)
    node, score = self._deepest(sums, self._depths)
    return RollUps(node, score)

  def sparse(self, probabilities) -> RollUps:
    """Like calling it, for a scipy.sparse ``[n, T]`` matrix of scores.

    Only the nodes some row reaches are looked at (a dense ``[n, A]``
    array of every node would not fit for a large taxonomy): memory is
    about n x (the distinct nodes the batch touches) floats.
    """
    sums = probabilities.tocsr().astype(np.float64).dot(
        self._matrix).tocsc()
    touched = np.flatnonzero(np.diff(sums.indptr))  # ascending node index
    dense = sums[:, touched].toarray()
    pick, score = self._deepest(dense, self._depths[touched])
    node = np.where(pick >= 0, touched[np.maximum(pick, 0)] if len(touched)
                    else -1, -1).astype(np.int64)
    return RollUps(node, score)

  def _deepest(self, sums: np.ndarray, depths: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray]:
    """(column, score) per row: the deepest column reaching the threshold,
    ties to the higher score then the first column; -1 and NaN when none."""
    n = sums.shape[0]
    if sums.shape[1] == 0:
      return np.full(n, -1, np.int64), np.full(n, np.nan)
    reach = sums >= self.label_taxa.threshold
    depth = np.where(reach, depths[None, :], -1)
    best = depth.max(axis=1)
    candidates = reach & (depth == best[:, None])
    # Columns ascend by taxon id, so argmax's first maximum is the lower id.
    pick = np.argmax(np.where(candidates, sums, -np.inf), axis=1)
    found = best >= 0
    node = np.where(found, pick, -1).astype(np.int64)
    score = np.where(found, sums[np.arange(n), pick], np.nan)
    return node, score


# --------------------------------------------------------------------------
# Flags.


@dataclasses.dataclass(frozen=True)
class TaxonomyConfig:
  """``--taxa``, ``--rollup_threshold`` and ``--max_unmatched_labels``.

  Raises:
    TaxonomyError: a threshold or fraction outside (0, 1] / [0, 1].
  """

  taxa: Optional[str] = None
  rollup_threshold: float = DEFAULT_ROLLUP_THRESHOLD
  max_unmatched_labels: float = DEFAULT_MAX_UNMATCHED_LABELS

  def __post_init__(self):
    if not 0.0 < self.rollup_threshold <= 1.0:
      raise TaxonomyError(f"--rollup_threshold must be in (0, 1], not "
                          f"{self.rollup_threshold}")
    if not 0.0 <= self.max_unmatched_labels <= 1.0:
      raise TaxonomyError(f"--max_unmatched_labels is a fraction of the "
                          f"labelmap in [0, 1], not "
                          f"{self.max_unmatched_labels}")

  @staticmethod
  def add_flags(parser) -> None:
    parser.add_argument(
        "--taxa", metavar="PATH",
        help="taxonomy for classifiers' labels: an iNaturalist taxa table "
        "or a GBIF backbone Taxon.tsv; adds label_taxon_id, top_k_taxon_ids "
        "and the rollup_* columns to the predictions (docs/taxonomy.md)")
    parser.add_argument(
        "--rollup_threshold", type=float, default=DEFAULT_ROLLUP_THRESHOLD,
        help="with --taxa: a photo is answered at the deepest taxon whose "
        "labels' summed probability reaches this")
    parser.add_argument(
        "--max_unmatched_labels", type=float,
        default=DEFAULT_MAX_UNMATCHED_LABELS,
        help="with --taxa: the largest fraction of a labelmap that may "
        "match no taxon before the job refuses to start")

  @classmethod
  def from_args(cls, args) -> "TaxonomyConfig":
    return cls(taxa=args.taxa, rollup_threshold=args.rollup_threshold,
               max_unmatched_labels=args.max_unmatched_labels)


def attach(models, taxonomy: TaxonomyConfig, read_labels) -> tuple:
  """Each classifier with its labels' taxa (``ResolvedModel.label_taxa``).

  Args:
    models: resolved models (``transforms.models.ResolvedModel``).
    taxonomy: the flags; without ``--taxa`` the models come back as given.
    read_labels: ``ResolvedModel -> [label]`` (the labelmap's names).

  Returns:
    The models, classifiers with ``label_taxa`` set.

  Raises:
    TaxonomyError: the table cannot be read, or a labelmap has more
      unmatched labels than ``--max_unmatched_labels``.
  """
  if not taxonomy.taxa:
    return tuple(models)
  taxa = read_taxa(taxonomy.taxa)
  out = []
  for model in models:
    if model.spec.kind != "classifier":
      out.append(model)
      continue
    matched = match_labels(read_labels(model), taxa,
                           taxonomy.rollup_threshold)
    if matched.unmatched_fraction > taxonomy.max_unmatched_labels:
      shown = ", ".join(repr(l) for l in matched.unmatched[:5])
      raise TaxonomyError(
          f"{len(matched.unmatched)} of the {len(matched.label_taxon)} labels "
          f"of {model.name} ({matched.unmatched_fraction:.1%}, e.g. {shown}) "
          f"match no taxon of --taxa {taxonomy.taxa}, more than "
          f"--max_unmatched_labels {taxonomy.max_unmatched_labels}; give a "
          f"taxonomy that covers the labelmap, or raise "
          f"--max_unmatched_labels")
    out.append(dataclasses.replace(model, label_taxa=matched))
  return tuple(out)
