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

With ``--taxa`` (an iNaturalist taxa table or a GBIF Taxon.tsv, see
transforms/taxonomy.py)
the label column holds taxon ids, and the figures are also given at genus
and family rank: a prediction (or neighbour) counts at a rank when its
ancestor at that rank is the photo's.  Classifier label names are matched to
taxa by name.  At a rank, photos whose taxon has no ancestor of that rank
are left out, and for embedders the candidates are the photos whose
ancestor at that rank occurs at least twice.

For a predictions table made with ``--taxa`` (roll-up columns), the
classifier's entry also has ``rollup``: the share of photos answered at each
rank and the accuracy at the answered rank (tools/rollup.py).  An embedder
whose photos natvision-label labelled (``OUT/labels/<model>.parquet``) has
the same figures for those labels, under ``labels``.

Macro figures average the per-label recalls over the labels evaluated.
The figures are computed in tools/recall.py and tools/rollup.py; this
module is the command (flags, tables, evaluation.json, the printed table).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems

from natvision import transforms
from natvision.transforms import console
from natvision.transforms import extras
from natvision.transforms import helptext
from natvision.transforms import models as models_lib
from natvision.transforms import storage
from natvision.transforms import taxonomy
from natvision.tools import label as label_lib
from natvision.tools import rollup
from natvision.tools import tables as tables_lib
# The figures are tools/recall.py's and tools/rollup.py's; kept importable
# from here.
from natvision.tools.recall import (NO_LABEL, RANKS, EvaluationError,  # noqa: F401
                          evaluate_classifier, evaluate_embedder,
                          nearest_neighbours, normalize_label)
from natvision.transforms.taxonomy import Taxa  # noqa: F401

EVALUATION_FILE = "evaluation.json"
DEFAULT_K = (1, 5)


def read_taxa(path: str) -> Taxa:
  """The --taxa table (transforms/taxonomy.py: iNaturalist or GBIF).

  Raises:
    EvaluationError: unreadable, or neither format's columns.
  """
  try:
    return taxonomy.read_taxa(path)
  except taxonomy.TaxonomyError as e:
    raise EvaluationError(str(e)) from e


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
      columns = ["top_k_label_ids", config.label_column]
      if taxa is not None and set(rollup.COLUMNS) <= set(schema.names):
        columns += list(rollup.COLUMNS)
      with_prior = PRIOR_TOP in schema.names
      if with_prior:
        columns += [PRIOR_TOP, "prior_applied"]
      rows = table.read(columns)
      labelmap = _labelmap_for(table, overrides)
      entry = evaluate_classifier(rows, config.label_column, labelmap, ks,
                                  taxa)
      if with_prior:
        entry["with_prior"] = _with_prior(rows, config.label_column,
                                          labelmap, ks, taxa)
      if taxa is not None:
        figures = rollup.evaluate_rollup(rows, config.label_column, taxa)
        if figures is not None:
          entry["rollup"] = figures
    else:
      rows = table.read(["embedding", config.label_column])
      entry = evaluate_embedder(rows, config.label_column, ks, taxa,
                                config.queries, config.seed)
      if taxa is not None:
        labels = _label_figures(config, table, taxa)
        if labels is not None:
          entry["labels"] = labels
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


def _label_figures(config: EvaluateConfig, table: tables_lib.ModelTable,
                   taxa: Taxa) -> Optional[dict]:
  """natvision-label's table of this embedder's photos, scored per rank
  (tools/rollup.py ``evaluate_labels``); None when there is none."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path = label_lib.default_out(config.output_dir, table.name)
  if not storage.exists(path):
    return None
  with storage.failing_as("reading", path), FileSystems.open(path) as f:
    labels = pq.read_table(f, columns=["image_id", "taxon_id", "rank"])
  figures = rollup.evaluate_labels(
      labels, table.read(["image_id", config.label_column]),
      config.label_column, taxa)
  return dict({"table": path}, **figures)


# A --prior run's prior-adjusted top-k, evaluated beside the image-only one.
PRIOR_TOP = "prior_top_k_label_ids"


def _with_prior(rows, label_column: str, labelmap: Sequence[str],
                ks: Sequence[int], taxa: Optional[Taxa]) -> dict:
  """The same figures from the prior-adjusted top-k (``prior_top_k_*``,
  equal to the image-only top-k where the prior was not applied), over the
  same photos, with how many photos the prior re-weighted."""
  figures = evaluate_classifier(rows, label_column, labelmap, ks, taxa,
                                top_column=PRIOR_TOP)
  applied = rows.column("prior_applied").to_pylist()
  keep = ("photos", "recall_at_k", "macro_recall_at_k", "ranks")
  block = {key: figures[key] for key in keep if key in figures}
  block["prior_applied"] = sum(1 for a in applied if a)
  return block


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
    prior = m.get("with_prior")
    if prior is not None:
      blocks += [("label+prior", prior)] + [
          (f"{rank}+prior", block)
          for rank, block in prior.get("ranks", {}).items()]
    for rank, block in blocks:
      skipped = m["skipped"] if rank in ("label", "label+prior") else block.get(
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


def rollup_line(figures: dict, what: str = "roll-up") -> str:
  """One line of roll-up figures (of ``what``): the share and accuracy per
  rank."""
  parts = []
  for rank, share in figures["share_by_rank"].items():
    accuracy = figures["accuracy_by_rank"].get(rank)
    parts.append(f"{rank} {share:.3f}" + (
        f" (accuracy {accuracy:.3f})" if accuracy is not None else ""))
  return (f"{what} answered {figures['answered']} of {figures['photos']} "
          f"photo(s): " + ", ".join(parts))


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
  p = helptext.ArgumentParser(
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
  for name, m in evaluation["models"].items():
    if m.get("rollup"):
      print(f"  {name}: {rollup_line(m['rollup'])}")
    if m.get("labels"):
      print(f"  {name}: "
            + rollup_line(m["labels"], "natvision-label"))
  print(f"written to {FileSystems.join(config.output_dir, EVALUATION_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
