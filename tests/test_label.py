"""tools/label.py: natvision-label on synthetic embeddings tables.

The reference run holds clusters of unit vectors, one per species, along
orthogonal axes: Alpha, Beta and Delta species of genus One, Gamma of genus
Two (one family).  Alpha has only four reference photos, so that a photo at
Alpha's cluster has six far neighbours of another species among its ten:
an unweighted vote would not answer Alpha there.  Delta's photos mirror
Beta's (the same noise, axes swapped), so a photo midway between them has
as many neighbours of each.  Query photos sit at the clusters, midway
between Beta and Delta, and opposite every cluster.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.tools import index as index_lib
from natvision.tools import label
from natvision.tools import label_vote

MODEL = "inaturalist_v2"
D = 16
ROOT, KINGDOM, FAMILY = 1, 2, 5
ONE, TWO = 11, 21  # genera
# Species: Alpha, Beta, Delta in One; Gamma in Two.
ALPHA, BETA, DELTA, GAMMA = 101, 102, 103, 201
AXIS = {ALPHA: 0, BETA: 1, GAMMA: 2, DELTA: 3}
COUNT = {ALPHA: 4, BETA: 20, GAMMA: 20, DELTA: 20}
REFERENCE_ROWS = sum(COUNT.values()) + 1


def _write_taxa(path):
  rows = [(ROOT, "", "stateofmatter", "Life"),
          (KINGDOM, f"{ROOT}", "kingdom", "Fungi"),
          (FAMILY, f"{ROOT}/{KINGDOM}", "family", "Familia"),
          (ONE, f"{ROOT}/{KINGDOM}/{FAMILY}", "genus", "One"),
          (TWO, f"{ROOT}/{KINGDOM}/{FAMILY}", "genus", "Two"),
          (ALPHA, f"{ROOT}/{KINGDOM}/{FAMILY}/{ONE}", "species", "One alpha"),
          (BETA, f"{ROOT}/{KINGDOM}/{FAMILY}/{ONE}", "species", "One beta"),
          (DELTA, f"{ROOT}/{KINGDOM}/{FAMILY}/{ONE}", "species", "One delta"),
          (GAMMA, f"{ROOT}/{KINGDOM}/{FAMILY}/{TWO}", "species",
           "Two gamma")]
  with open(path, "w", encoding="utf-8") as f:
    f.write("taxon_id\tancestry\trank_level\trank\tname\tactive\n")
    for taxon, ancestry, rank, name in rows:
      f.write(f"{taxon}\t{ancestry}\t10\t{rank}\t{name}\ttrue\n")
  return str(path)


def _write_table(run, ids, vectors, columns=None, parts=1):
  folder = os.path.join(run, "embeddings", MODEL)
  os.makedirs(folder, exist_ok=True)
  n = len(ids)
  flat = pa.array(np.asarray(vectors, np.float32).reshape(-1), pa.float32())
  data = {"image_id": ids, "uri": [f"/photos/{i}.jpg" for i in ids],
          "model": [MODEL] * n,
          "embedding": pa.FixedSizeListArray.from_arrays(flat, D)}
  data.update(columns or {})
  table = pa.table(data)
  step = -(-n // parts)
  for p in range(parts):
    pq.write_table(table.slice(p * step, step),
                   os.path.join(folder, f"part-{p:05d}-of-{parts:05d}.parquet"))


def _axis(*weights):
  v = np.zeros(D)
  for axis, w in weights:
    v[axis] = w
  return v


@pytest.fixture
def runs(tmp_path):
  rng = np.random.default_rng(3)
  ids, vectors, taxa_col = [], [], []
  for taxon, axis in AXIS.items():
    for i in range(COUNT[taxon]):
      if taxon == DELTA:  # Beta's i-th photo with axes 1 and 3 swapped
        vectors.append(vectors[ids.index(f"r{BETA}_{i}")][[0, 3, 2, 1] +
                                                           list(range(4, D))])
      else:
        # Tight clusters: cosine ~0.99 to their axis, ~0 to the others.
        vectors.append(_axis((axis, 1.0)) + 0.03 * rng.standard_normal(D))
      ids.append(f"r{taxon}_{i}")
      taxa_col.append(taxon)
  # A reference photo without a taxon id, right where a query sits: it
  # must not vote.
  vectors.append(_axis((GAMMA_AXIS, 1.0)))
  ids.append("r_untaxed")
  taxa_col.append(None)
  reference = str(tmp_path / "ref")
  _write_table(reference, ids, vectors,
               {"taxon_id": pa.array(taxa_col, pa.int64())}, parts=2)
  queries = {
      "q_alpha": _axis((0, 1.0), (2, 0.1)),  # at Alpha, a little to Gamma
      "q_beta": _axis((1, 1.0)),
      "q_gamma": _axis((2, 1.0)),
      "q_beta_delta": _axis((1, 1.0), (3, 1.0)),  # midway: genus One
      "q_opposite": -_axis((0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)),
  }
  extra = {f"q_beta_{i}": _axis((1, 1.0)) + 0.05 * rng.standard_normal(D)
           for i in range(7)}
  queries.update(extra)
  # The true taxa, for natvision-evaluate: q_beta_0 is (say) a Delta that
  # looks like a Beta, so its species answer is wrong.
  truth = {"q_alpha": ALPHA, "q_gamma": GAMMA, "q_beta_delta": DELTA,
           "q_opposite": GAMMA, "q_beta_0": DELTA}
  run = str(tmp_path / "run")
  _write_table(run, list(queries), np.array(list(queries.values())),
               {"taxon_id": [truth.get(q, BETA) for q in queries]}, parts=3)
  return {"run": run, "reference": reference,
          "taxa": _write_taxa(tmp_path / "taxa.tsv"), "queries": queries,
          "tmp": tmp_path}


GAMMA_AXIS = AXIS[GAMMA]


def _label(runs, *extra):
  out = str(runs["tmp"] / "labels.parquet")
  status = label.main(["--output_dir", runs["run"], "--reference",
                       runs["reference"], "--model", MODEL, "--taxa",
                       runs["taxa"], "--out", out, *extra])
  assert status == 0
  table = pq.read_table(out)
  return table, {r["image_id"]: r for r in table.to_pylist()}


def test_photos_at_a_cluster_get_its_species(runs, capsys):
  table, rows = _label(runs)
  assert table.schema.names == label_vote.SCHEMA.names
  assert rows["q_beta"]["taxon_id"] == BETA
  assert rows["q_beta"]["rank"] == "species"
  assert rows["q_beta"]["name"] == "One beta"
  assert rows["q_beta"]["neighbours"] == 10
  assert rows["q_beta"]["top_neighbour_id"].startswith(f"r{BETA}_")
  assert rows["q_gamma"]["taxon_id"] == GAMMA
  # The untaxed reference photo is the nearest to q_gamma, but no voter.
  assert rows["q_gamma"]["top_neighbour_id"].startswith(f"r{GAMMA}_")
  assert rows["q_gamma"]["score"] == pytest.approx(1.0)
  # Alpha has 4 reference photos: the other 6 of its 10 neighbours are
  # Gammas at cosine ~0.1, so only a vote weighted by similarity reaches
  # 0.8 for Alpha (an unweighted one gives it 0.4).
  assert rows["q_alpha"]["taxon_id"] == ALPHA
  assert rows["q_alpha"]["rank"] == "species"
  assert 0.8 <= rows["q_alpha"]["score"] < 0.99
  assert (f"labelled from {REFERENCE_ROWS} reference rows"
          in capsys.readouterr().out)


def test_a_photo_midway_between_sibling_species_rolls_up_to_their_genus(
    runs):
  _, rows = _label(runs)
  midway = rows["q_beta_delta"]
  # Five neighbours of each: no species reaches 0.8, their genus does.
  assert midway["neighbours"] == 10
  assert midway["taxon_id"] == ONE
  assert midway["rank"] == "genus" and midway["name"] == "One"
  assert midway["score"] == pytest.approx(1.0)
  # At 0.5 both species reach it (a tie, within rounding).
  _, rows = _label(runs, "--rollup_threshold", "0.5")
  assert rows["q_beta_delta"]["taxon_id"] in (BETA, DELTA)
  assert rows["q_beta_delta"]["rank"] == "species"
  assert rows["q_beta_delta"]["score"] == pytest.approx(0.5)


def test_a_photo_with_no_neighbour_of_positive_similarity_gets_no_taxon(
    runs):
  _, rows = _label(runs)
  opposite = rows["q_opposite"]
  assert opposite["neighbours"] == 0
  assert opposite["taxon_id"] is None and opposite["rank"] is None
  assert opposite["score"] is None and opposite["top_neighbour_id"] is None


def test_every_query_photo_has_one_row_batch_by_batch(runs):
  out = str(runs["tmp"] / "batched.parquet")
  summary = label.label_run(runs["run"], runs["reference"], MODEL,
                            runs["taxa"], out=out, batch_rows=2)
  table = pq.read_table(out)
  ids = table.column("image_id").to_pylist()
  assert sorted(ids) == sorted(runs["queries"])
  assert summary["photos"] == len(runs["queries"])
  assert summary["answered"] == len(runs["queries"]) - 1
  assert summary["reference_rows_without_taxon"] == 1
  # The same answers as one batch per file.
  _, rows = _label(runs)
  assert {r["image_id"]: r["taxon_id"] for r in table.to_pylist()} == {
      i: r["taxon_id"] for i, r in rows.items()}
  meta = json.loads(table.schema.metadata[label.METADATA_KEY])
  assert meta["k"] == 10 and meta["index"]["kind"] == "exact"
  assert not os.path.exists(out + ".partial")


def test_the_default_table_and_an_index_built_by_natvision_index(runs):
  index_lib.build_index(runs["reference"], MODEL)
  assert label.main(["--output_dir", runs["run"], "--reference",
                     runs["reference"], "--model", MODEL, "--taxa",
                     runs["taxa"], "--k", "5"]) == 0
  table = pq.read_table(label.default_out(runs["run"], MODEL))
  meta = json.loads(table.schema.metadata[label.METADATA_KEY])
  assert meta["index"]["factory"] == "Flat" and meta["k"] == 5
  rows = {r["image_id"]: r for r in table.to_pylist()}
  assert rows["q_beta"]["taxon_id"] == BETA
  assert rows["q_beta"]["neighbours"] == 5


def test_a_run_labelled_from_itself_leaves_each_photo_out(runs):
  out = str(runs["tmp"] / "self.parquet")
  label.label_run(runs["reference"], runs["reference"], MODEL, runs["taxa"],
                  k=3, out=out)
  rows = pq.read_table(out).to_pylist()
  assert len(rows) == REFERENCE_ROWS
  for row in rows:
    assert row["top_neighbour_id"] != row["image_id"]
  by_id = {r["image_id"]: r for r in rows}
  assert by_id[f"r{GAMMA}_0"]["taxon_id"] == GAMMA
  assert by_id[f"r{BETA}_3"]["taxon_id"] == BETA


@pytest.mark.parametrize("change,flag", [
    (lambda r: ["--reference", str(r["tmp"] / "nothing")], "--reference"),
    (lambda r: ["--taxon_column", "species"], "--taxon_column species"),
    (lambda r: ["--model", "inception_v3"], "--model inception_v3"),
    (lambda r: ["--taxa", str(r["tmp"] / "missing.tsv")], "--taxa"),
])
def test_bad_flags_exit_2_naming_the_flag(runs, capsys, change, flag):
  argv = {"--output_dir": runs["run"], "--reference": runs["reference"],
          "--model": MODEL, "--taxa": runs["taxa"]}
  replaced = change(runs)
  argv.update(dict(zip(replaced[::2], replaced[1::2])))
  out = str(runs["tmp"] / "bad.parquet")
  status = label.main([a for kv in argv.items() for a in kv] + ["--out", out])
  assert status == 2
  err = capsys.readouterr().err
  assert flag in err and "Traceback" not in err
  assert not os.path.exists(out)


@pytest.mark.parametrize("argv,flag", [
    (["--k", "0"], "--k must be at least 1"),
    (["--rollup_threshold", "1.5"], "--rollup_threshold"),
    (["--rollup_treshold", "0.5"], "did you mean --rollup_threshold"),
])
def test_bad_values_exit_2_before_anything_is_read(runs, capsys, argv, flag):
  with pytest.raises(SystemExit) as e:
    label.main(["--output_dir", runs["run"], "--reference",
                runs["reference"], "--model", MODEL, "--taxa",
                runs["taxa"], *argv])
  assert e.value.code == 2
  assert flag in capsys.readouterr().err


def test_vote_weights_clip_negative_similarity_and_skip_untaxed_rows():
  from natvision.transforms import taxonomy  # pylint: disable=import-outside-toplevel
  taxa = taxonomy.Taxa(kind=taxonomy.INATURALIST,
                       rank={1: "genus", 2: "species", 3: "species"},
                       name={1: "G", 2: "G a", 3: "G b"},
                       ancestry={1: (), 2: (1,), 3: (1,)})
  ref = label_vote.Reference.from_columns(
      pa.array(["a", "b", "c", "d"]), np.array([2, 3, 0, 99]),
      np.array([True, True, False, True]), taxa, 0.8)
  vote = label_vote.Vote(ref)
  weights, _ = vote.weights(np.array([[0.9, -0.5, 0.8, 0.7]]),
                            np.array([[0, 1, 2, -1]]))
  np.testing.assert_allclose(weights, [[0.9, 0.0, 0.0, 0.0]])
  # Taxon 99 is not in the taxonomy: its weight stays in the denominator.
  batch = vote(["x"], ["u"], np.array([[0.5, 0.5]]), np.array([[0, 3]]))
  assert batch.column("neighbours").to_pylist() == [2]
  assert batch.column("taxon_id").to_pylist() == [None]
  batch = vote(["x"], ["u"], np.array([[0.9, 0.1]]), np.array([[0, 3]]))
  assert batch.column("taxon_id").to_pylist() == [2]
  assert batch.column("score").to_pylist() == [pytest.approx(0.9)]


def test_natvision_evaluate_scores_the_label_table_per_rank(runs):
  from natvision.tools import evaluate  # pylint: disable=import-outside-toplevel
  config = evaluate.EvaluateConfig(output_dir=runs["run"],
                                   label_column="taxon_id",
                                   taxa=runs["taxa"], write=False)
  assert "labels" not in evaluate.evaluate(config)["models"][MODEL]
  assert label.main(["--output_dir", runs["run"], "--reference",
                     runs["reference"], "--model", MODEL, "--taxa",
                     runs["taxa"]]) == 0
  figures = evaluate.evaluate(config)["models"][MODEL]["labels"]
  assert figures["table"] == label.default_out(runs["run"], MODEL)
  assert figures["photos"] == 12 and figures["answered"] == 11
  assert figures["share_by_rank"] == pytest.approx(
      {"species": 10 / 12, "genus": 1 / 12, "none": 1 / 12})
  # Species: all right but q_beta_0; genus One is right for the Delta.
  assert figures["accuracy_by_rank"] == pytest.approx(
      {"species": 0.9, "genus": 1.0})
  assert figures["accuracy"] == pytest.approx(10 / 11)


@pytest.mark.parametrize("kind,exact_below", [
    ("exact", index_lib.EXACT_BELOW_FLOATS), ("approximate", 0)])
def test_a_reference_in_a_bucket_is_labelled_from_its_mapped_index(
    runs, gcs_server, kind, exact_below):
  import uuid  # pylint: disable=import-outside-toplevel
  from tests.gcs_server import upload_dir  # pylint: disable=import-outside-toplevel
  _, exact = _label(runs)  # no index: exact, in memory
  meta = index_lib.build_index(runs["reference"], MODEL,
                               exact_below=exact_below)
  assert meta["kind"] == kind
  folder = os.path.join(runs["reference"], "embeddings", MODEL, "_index")
  # The approximate index's lists are a file of their own, mapped.
  assert os.path.exists(os.path.join(folder, "index.ivfdata")) == (
      kind == "approximate")
  _, local = _label(runs)
  _same(local, exact)  # one inverted list here: the same neighbours
  remote = f"{gcs_server.bucket_url}/label-{uuid.uuid4().hex[:8]}/ref"
  upload_dir(runs["reference"], remote)
  searcher = index_lib.open_searcher(remote, MODEL)
  assert searcher.meta["kind"] == kind and "in_memory" not in searcher.meta
  out = str(runs["tmp"] / "remote.parquet")
  assert label.main(["--output_dir", runs["run"], "--reference", remote,
                     "--model", MODEL, "--taxa", runs["taxa"],
                     "--out", out]) == 0
  rows = {r["image_id"]: r for r in pq.read_table(out).to_pylist()}
  _same(rows, local)


def _same(rows, others):
  """The same answers (scores within float rounding)."""
  assert rows.keys() == others.keys()
  for image_id, row in rows.items():
    other = others[image_id]
    assert {k: v for k, v in row.items() if k != "score"} == {
        k: v for k, v in other.items() if k != "score"}, image_id
    assert row["score"] == pytest.approx(other["score"], nan_ok=True) or (
        row["score"] is other["score"] is None)


def test_the_reference_index_is_memory_mapped_not_read(runs, monkeypatch):
  import faiss  # pylint: disable=import-outside-toplevel
  index_lib.build_index(runs["reference"], MODEL)
  calls = []
  read_index = faiss.read_index

  def spy(path, flags=0):
    calls.append(flags)
    return read_index(path, flags)
  monkeypatch.setattr(faiss, "read_index", spy)
  monkeypatch.setattr(faiss, "deserialize_index", None)  # never called
  searcher = index_lib.open_searcher(runs["reference"], MODEL)
  assert calls == [faiss.IO_FLAG_MMAP_IFC]
  scores, rows = searcher.search(np.array([_axis((1, 1.0))]), 3)
  assert scores[0][0] > 0.9 and rows[0][0] >= 0


def test_a_run_that_fails_midway_leaves_no_table(runs, monkeypatch):
  calls = []
  vote = label_vote.Vote.__call__

  def failing(self, *args):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk gone")
    return vote(self, *args)
  monkeypatch.setattr(label_vote.Vote, "__call__", failing)
  out = str(runs["tmp"] / "half.parquet")
  with pytest.raises(OSError, match="disk gone"):
    label.label_run(runs["run"], runs["reference"], MODEL, runs["taxa"],
                    out=out, batch_rows=2)
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_taxon_ids_are_read_from_integer_or_text_columns():
  ids, has = label._taxon_ids(  # pylint: disable=protected-access
      pa.chunked_array([pa.array([" 101", None, "7"])]), "taxon_id")
  assert ids.tolist()[0::2] == [101, 7] and has.tolist() == [True, False,
                                                              True]
  ids, has = label._taxon_ids(  # pylint: disable=protected-access
      pa.chunked_array([pa.array([5, None], pa.int32())]), "taxon_id")
  assert ids.tolist()[0] == 5 and has.tolist() == [True, False]
  with pytest.raises(label.LabelError, match="--taxon_column species"):
    label._taxon_ids(  # pylint: disable=protected-access
        pa.chunked_array([pa.array(["Amanita muscaria"])]), "species")
