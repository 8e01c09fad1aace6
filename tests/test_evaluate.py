"""natvision-evaluate on the tables of a real job over labelled crops.

The job (tests/conftest.py ``labelled_job``) runs the three tiny stand-ins
over crops of six photos listed in a CSV manifest with a label column.  The
figures natvision-evaluate writes are compared with an independent
computation on the same tables: scikit-learn's ``top_k_accuracy_score`` for
the classifier, a brute-force numpy k-NN for the embedders.
"""

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import top_k_accuracy_score

from tests import labelled_photos
from natvision.tools import evaluate
from natvision.transforms import models

EMBEDDERS = ("inaturalist_v2", "inception_resnet_v2")


def _norm(label):
  return " ".join((label or "").split()).lower() or None


def _table(out, kind, model):
  folder = os.path.join(out, kind, model)
  return pa.concat_tables([pq.read_table(os.path.join(folder, f))
                           for f in sorted(os.listdir(folder))
                           if f.endswith(".parquet")])


@pytest.fixture(scope="module")
def evaluated(labelled_job):
  out = labelled_job["out"]
  assert evaluate.main(["--output_dir", out, "--label_column", "species"]) == 0
  with open(os.path.join(out, "evaluation.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def labelmap(labelled_job):
  return models.read_labelmap(os.path.join(
      labelled_job["models"], "fungi_mobile_v1", "labelmap.csv"))


def _sklearn_classifier_figures(table, labelmap, ks, true_of=None):
  """Recall@k with sklearn, from the stored top-k ids and scores."""
  by_name = {_norm(n): i for i, n in enumerate(labelmap)}
  rows = [r for r in table.to_pylist() if _norm(r["species"]) in by_name]
  y_true = np.array([by_name[_norm(r["species"])] for r in rows])
  scores = np.zeros((len(rows), len(labelmap)))
  for i, r in enumerate(rows):
    scores[i, r["top_k_label_ids"]] = r["top_k_scores"]
  micro = {k: top_k_accuracy_score(y_true, scores, k=k,
                                   labels=np.arange(len(labelmap)))
           for k in ks}
  per_label = {}
  for label in sorted(set(y_true)):
    mask = y_true == label
    per_label[labelmap[label]] = {
        k: top_k_accuracy_score(y_true[mask], scores[mask], k=k,
                                labels=np.arange(len(labelmap)))
        for k in ks}
  macro = {k: np.mean([v[k] for v in per_label.values()]) for k in ks}
  return len(rows), micro, macro, per_label


def test_classifier_recall_equals_sklearn(evaluated, labelled_job, labelmap):
  table = _table(labelled_job["out"], "predictions", "fungi_mobile_v1")
  n, micro, macro, per_label = _sklearn_classifier_figures(table, labelmap,
                                                           (1, 5))
  got = evaluated["models"]["fungi_mobile_v1"]
  assert got["kind"] == "classifier" and got["label_column"] == "species"
  assert got["photos"] == n == table.num_rows - 2
  for k in (1, 5):
    assert got["recall_at_k"][str(k)] == pytest.approx(micro[k])
    assert got["macro_recall_at_k"][str(k)] == pytest.approx(macro[k])
  assert {r["label"]: r["recall_at_k"]["1"] for r in got["per_label"]} == (
      pytest.approx({label: v[1] for label, v in per_label.items()}))
  # The figures are informative: neither all hits nor all misses, and the
  # labels written in other case and spacing matched.
  assert 0 < micro[1] < 1 and micro[1] <= micro[5]
  assert len(got["per_label"]) == len(labelmap_names_used(labelled_job))
  assert got["skipped"] == 2
  assert got["skipped_labels"] == {labelled_photos.NOT_IN_LABELMAP: 1,
                                   "(no label)": 1}


def labelmap_names_used(labelled_job):
  return {_norm(r["species"]) for r in labelled_job["photos"].rows
          if _norm(r["species"]) and r["species"] != labelled_photos.NOT_IN_LABELMAP}


def _brute_force_knn(table, ks, key=_norm, queries=None):
  """Recall@k of exact cosine k-NN, computed with plain numpy."""
  labels = [key(v) for v in table.column("species").to_pylist()]
  counts = collections.Counter(l for l in labels if l is not None)
  keep = [i for i, l in enumerate(labels) if l is not None and counts[l] >= 2]
  x = np.array(table.column("embedding").to_pylist(), np.float64)[keep]
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y = np.array([labels[i] for i in keep], dtype=object)
  sim = x @ x.T
  np.fill_diagonal(sim, -np.inf)
  order = np.argsort(-sim, axis=1, kind="stable")
  rows = np.arange(len(keep)) if queries is None else queries
  micro, per_label = {}, collections.defaultdict(dict)
  for k in ks:
    hit = np.array([(y[order[q, :k]] == y[q]).any() for q in rows])
    micro[k] = hit.mean()
    for label in set(y[rows]):
      per_label[label][k] = hit[y[rows] == label].mean()
  macro = {k: np.mean([v[k] for v in per_label.values()]) for k in ks}
  skipped = len(labels) - len(keep)
  return len(rows), skipped, micro, macro, per_label


@pytest.mark.parametrize("model", EMBEDDERS)
def test_embedder_recall_equals_brute_force_knn(evaluated, labelled_job,
                                                model):
  table = _table(labelled_job["out"], "embeddings", model)
  n, skipped, micro, macro, per_label = _brute_force_knn(table, (1, 5))
  got = evaluated["models"][model]
  assert got["kind"] == "embedder"
  assert (got["photos"], got["skipped"]) == (n, skipped)
  for k in (1, 5):
    assert got["recall_at_k"][str(k)] == pytest.approx(micro[k])
    assert got["macro_recall_at_k"][str(k)] == pytest.approx(macro[k])
  got_rows = {_norm(r["label"]): r["recall_at_k"]["1"]
              for r in got["per_label"]}
  assert got_rows == pytest.approx({l: v[1] for l, v in per_label.items()})
  # One crop carries another source's label: R@1 is below 1, R@5 is not.
  assert micro[1] < 1 and micro[5] == 1
  # Source 5 keeps one labelled crop (seen once) and one crop has none.
  only_once = _norm(labelled_job["photos"].source_labels[5])
  assert {_norm(l): c for l, c in got["skipped_labels"].items()} == {
      only_once: 1, "(no label)": 1, _norm(labelled_photos.NOT_IN_LABELMAP): 1}


def test_sampled_queries_are_seeded_and_recorded(labelled_job):
  out = labelled_job["out"]
  config = evaluate.EvaluateConfig(output_dir=out, label_column="species",
                                   models=("inaturalist_v2",), queries=6,
                                   seed=3, write=False)
  got = evaluate.evaluate(config)["models"]["inaturalist_v2"]
  assert got["queries"] == {"n": 6, "seed": 3, "candidates": 18}
  assert got["photos"] == 6
  table = _table(out, "embeddings", "inaturalist_v2")
  draw = np.sort(np.random.default_rng(3).choice(18, 6, replace=False))
  _, _, micro, _, _ = _brute_force_knn(table, (1, 5), queries=draw)
  assert got["recall_at_k"]["1"] == pytest.approx(micro[1])
  again = evaluate.evaluate(config)["models"]["inaturalist_v2"]
  assert again["recall_at_k"] == got["recall_at_k"]


def test_integer_label_column_holds_labelmap_ids(labelled_job, labelmap):
  table = _table(labelled_job["out"], "predictions", "fungi_mobile_v1")
  by_name = {_norm(n): i for i, n in enumerate(labelmap)}
  ids = [by_name.get(_norm(v)) for v in table.column("species").to_pylist()]
  ids = [9999 if i is None else i for i in ids]  # 9999: not a labelmap id
  with_ids = table.append_column("label_id_true", pa.array(ids, pa.int64()))
  by_id = evaluate.evaluate_classifier(with_ids, "label_id_true", labelmap,
                                       (1, 5))
  by_text = evaluate.evaluate_classifier(table, "species", labelmap, (1, 5))
  assert by_id["recall_at_k"] == by_text["recall_at_k"]
  assert by_id["photos"] == by_text["photos"]
  assert by_id["skipped_labels"] == {"9999": 2}


def test_k_above_the_stored_top_k_is_reported(labelled_job, labelmap):
  table = _table(labelled_job["out"], "predictions", "fungi_mobile_v1")
  got = evaluate.evaluate_classifier(table, "species", labelmap, (1, 10))
  assert list(got["recall_at_k"]) == ["1"]
  assert "--top_k 10" in got["k_unavailable"]["10"]


def _taxa_truth(labelled_job):
  taxa = evaluate.read_taxa(labelled_job["photos"].taxa)
  genus = {s: g for s, g, _ in labelled_photos.TAXONOMY}
  family = {s: f for s, _, f in labelled_photos.TAXONOMY}
  return taxa, {"genus": genus, "family": family}


def test_taxa_ranks_for_the_classifier(labelled_job, labelmap):
  out = labelled_job["out"]
  got = evaluate.evaluate(evaluate.EvaluateConfig(
      output_dir=out, label_column="taxon_id", models=("fungi_mobile_v1",),
      taxa=labelled_job["photos"].taxa, write=False))["models"][
          "fungi_mobile_v1"]
  table = _table(out, "predictions", "fungi_mobile_v1").to_pylist()
  _, ranks = _taxa_truth(labelled_job)
  species_of_name = {_norm(name): sp for sp, name in zip(
      [t[0] for t in labelled_photos.TAXONOMY],
      labelled_job["photos"].source_labels)}
  rows = [r for r in table if r["taxon_id"]]
  assert got["photos"] == len(rows) and got["skipped"] == 2
  for k in (1, 5):
    species_hits = [int(r["taxon_id"]) in {species_of_name.get(_norm(l))
                                           for l in r["top_k_labels"][:k]}
                    for r in rows]
    assert got["recall_at_k"][str(k)] == pytest.approx(np.mean(species_hits))
    for rank, up in ranks.items():
      hits = [up[int(r["taxon_id"])] in {
          up.get(species_of_name.get(_norm(l))) for l in r["top_k_labels"][:k]}
              for r in rows]
      assert got["ranks"][rank]["recall_at_k"][str(k)] == pytest.approx(
          np.mean(hits)), (rank, k)
  # Coarser ranks never score lower, and here the genus figure is higher.
  assert (got["ranks"]["family"]["recall_at_k"]["1"]
          >= got["ranks"]["genus"]["recall_at_k"]["1"]
          >= got["recall_at_k"]["1"])


def test_taxa_ranks_for_an_embedder(labelled_job):
  out = labelled_job["out"]
  got = evaluate.evaluate(evaluate.EvaluateConfig(
      output_dir=out, label_column="taxon_id", models=("inaturalist_v2",),
      taxa=labelled_job["photos"].taxa, write=False))["models"][
          "inaturalist_v2"]
  table = _table(out, "embeddings", "inaturalist_v2")
  _, ranks = _taxa_truth(labelled_job)
  species = table.column("taxon_id").to_pylist()
  for rank, up in ranks.items():
    keyed = table.drop_columns(["species"]).append_column(
        "species", pa.array([str(up[int(t)]) if t else None for t in species]))
    n, skipped, micro, macro, _ = _brute_force_knn(keyed, (1, 5))
    block = got["ranks"][rank]
    assert block["photos"] == n
    for k in (1, 5):
      assert block["recall_at_k"][str(k)] == pytest.approx(micro[k])
      assert block["macro_recall_at_k"][str(k)] == pytest.approx(macro[k])
  # Genus 204 has only source 5 (one labelled crop): skipped at genus
  # rank; in family 302 it has neighbours.
  assert got["ranks"]["genus"]["photos"] == got["ranks"]["family"]["photos"] - 1


def test_partitioned_tables_read_like_plain_ones(labelled_job, tmp_path):
  """Ingestion output: the same rows split over snapshot_date= folders."""
  out = labelled_job["out"]
  for kind, model in (("predictions", "fungi_mobile_v1"),
                      ("embeddings", "inaturalist_v2")):
    table = _table(out, kind, model)
    half = table.num_rows // 2
    for date, part in (("2024-01-01", table.slice(0, half)),
                       ("2024-02-01", table.slice(half))):
      folder = tmp_path / kind / model / f"snapshot_date={date}"
      folder.mkdir(parents=True)
      pq.write_table(part, folder / "part-00000-of-00001.parquet")
      (folder / "_SUCCESS").write_text("{}")
  plain = evaluate.evaluate(evaluate.EvaluateConfig(
      output_dir=out, label_column="species",
      models=("fungi_mobile_v1", "inaturalist_v2"), write=False))
  split = evaluate.evaluate(evaluate.EvaluateConfig(
      output_dir=str(tmp_path), label_column="species",
      labelmaps=(("fungi_mobile_v1", os.path.join(
          labelled_job["models"], "fungi_mobile_v1", "labelmap.csv")),)))
  for model in ("fungi_mobile_v1", "inaturalist_v2"):
    assert split["models"][model]["recall_at_k"] == (
        plain["models"][model]["recall_at_k"])
    assert split["models"][model]["photos"] == plain["models"][model]["photos"]
  assert (tmp_path / "evaluation.json").exists()


def test_cli_prints_a_table_and_refuses_unknown_columns(labelled_job, capsys):
  out = labelled_job["out"]
  assert evaluate.main(["--output_dir", out, "--label_column", "species",
                        "--models", "inaturalist_v2", "--k", "1,3"]) == 0
  printed = capsys.readouterr().out
  header = printed.splitlines()[0].split()
  assert header[:5] == ["model", "kind", "rank", "photos", "skipped"]
  assert "R@3" in header
  line = next(l for l in printed.splitlines() if l.startswith("inaturalist"))
  assert line.split()[3] == "18"
  assert evaluate.main(["--output_dir", out, "--label_column", "nope"]) == 2
  assert "no column 'nope'" in capsys.readouterr().err


def test_a_prior_runs_figures_are_given_beside_the_image_only_ones(
    labelled_job, labelmap, tmp_path):
  """A --prior run's predictions carry prior_top_k_* beside top_k_*: the
  evaluation gives Recall@k of both over the same photos.  Here the "prior"
  puts the true label first for every other photo and leaves the rest as
  the image scores had them, so its Recall@1 is known exactly."""
  table = _table(labelled_job["out"], "predictions", "fungi_mobile_v1")
  by_name = {_norm(n): i for i, n in enumerate(labelmap)}
  rows = table.to_pylist()
  applied, prior_top = [], []
  for i, r in enumerate(rows):
    truth = by_name.get(_norm(r["species"]))
    helped = i % 2 == 0 and truth is not None
    applied.append(helped)
    prior_top.append([truth] + [t for t in r["top_k_label_ids"]
                                if t != truth][:len(r["top_k_label_ids"]) - 1]
                     if helped else r["top_k_label_ids"])
  table = table.append_column(
      "prior_top_k_label_ids", pa.array(prior_top, pa.list_(pa.int32())))
  table = table.append_column("prior_applied", pa.array(applied, pa.bool_()))
  folder = tmp_path / "predictions" / "fungi_mobile_v1"
  folder.mkdir(parents=True)
  pq.write_table(table, folder / "part-00000-of-00001.parquet")
  result = evaluate.evaluate(evaluate.EvaluateConfig(
      output_dir=str(tmp_path), label_column="species", ks=(1,),
      labelmaps=(("fungi_mobile_v1", os.path.join(
          labelled_job["models"], "fungi_mobile_v1", "labelmap.csv")),),
      write=False))
  entry = result["models"]["fungi_mobile_v1"]
  evaluated_rows = [(i, r) for i, r in enumerate(rows)
                    if _norm(r["species"]) in by_name]
  image_hits = [r["top_k_label_ids"][0] == by_name[_norm(r["species"])]
                for _, r in evaluated_rows]
  prior_hits = [applied[i] or hit
                for (i, _), hit in zip(evaluated_rows, image_hits)]
  assert entry["recall_at_k"]["1"] == pytest.approx(np.mean(image_hits))
  prior = entry["with_prior"]
  assert prior["photos"] == entry["photos"] == len(evaluated_rows)
  assert prior["recall_at_k"]["1"] == pytest.approx(np.mean(prior_hits))
  assert prior["recall_at_k"]["1"] > entry["recall_at_k"]["1"]
  assert prior["prior_applied"] == sum(applied)
  printed = evaluate.format_table(result)
  assert "label+prior" in printed
