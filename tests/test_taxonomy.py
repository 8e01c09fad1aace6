"""Taxonomy: name normalisation, reading taxa tables, matching, roll-up.

The roll-up cases are small enough to check by hand (the sums are in the
comments) and are also checked against a direct numpy computation: a dense
label x taxon mask built from the ancestries, summed per photo.
"""

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.transforms import config
from natvision.transforms import models as models_lib
from natvision.transforms import taxonomy

# id, ancestry, rank, name
TREE = (
    (1, "", "stateofmatter", "Life"),
    (10, "1", "kingdom", "Fungi"),
    (20, "1/10", "family", "Amanitaceae"),
    (21, "1/10", "family", "Boletaceae"),
    (30, "1/10/20", "genus", "Amanita"),
    (31, "1/10/21", "genus", "Boletus"),
    (40, "1/10/20/30", "species", "Amanita muscaria"),
    (41, "1/10/20/30", "species", "Amanita pantherina"),
    (42, "1/10/21/31", "species", "Boletus edulis"),
    (43, "1/10/21/31", "species", "Boletus pinophilus"),
)
LABELS = ("Amanita muscaria (L.) Lam.", "amanita  PANTHERINA",
          "Boletus edulis Bull.", "Boletus pinophilus", "Not a fungus")


def _write_inaturalist(path, rows=TREE, extra=()):
  lines = ["taxon_id\tancestry\trank_level\trank\tname\tactive"]
  lines += [f"{i}\t{a}\t0\t{r}\t{n}\ttrue" for i, a, r, n in rows]
  lines += list(extra)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


@pytest.fixture
def taxa(tmp_path):
  return taxonomy.read_taxa(_write_inaturalist(tmp_path / "taxa.csv"))


@pytest.mark.parametrize("name,normal", [
    ("Amanita muscaria (L.) Lam.", "amanita muscaria"),
    ("amanita  MUSCARIA", "amanita muscaria"),
    ("Amanita\tmuscaria", "amanita muscaria"),
    ("× Cupressocyparis leylandii", "cupressocyparis leylandii"),
    ("×Cupressocyparis leylandii", "cupressocyparis leylandii"),
    ("Salix x rubens Schrank", "salix rubens"),
    ("Mentha × piperita L.", "mentha piperita"),
    ("Amanita muscaria var. flavivolvata Singer",
     "amanita muscaria flavivolvata"),
    ("Boletus edulis Bull. ex Fr.", "boletus edulis"),
    ("Agaricus campestris de Candolle", "agaricus campestris"),
    ("Lactarius deterrimus Gröger", "lactarius deterrimus"),
    ("Cortinarius sp.", "cortinarius"),
    ("Russula sp. 2", "russula 2"),
    ("Amanita muscaria L. 1753", "amanita muscaria"),
    ("Russula", "russula"),
    ("  ", None),
    (None, None),
])
def test_normalize_name(name, normal):
  assert taxonomy.normalize_name(name) == normal


def test_inaturalist_table_text_gzip_and_parquet(tmp_path):
  text = _write_inaturalist(tmp_path / "taxa.csv")
  gz = tmp_path / "taxa.csv.gz"
  gz.write_bytes(gzip.compress((tmp_path / "taxa.csv").read_bytes()))
  parquet = str(tmp_path / "taxa.parquet")
  pq.write_table(pa.table({
      "taxon_id": [r[0] for r in TREE], "ancestry": [r[1] for r in TREE],
      "rank": [r[2] for r in TREE], "name": [r[3] for r in TREE]}), parquet)
  for path in (text, str(gz), parquet):
    taxa = taxonomy.read_taxa(path)
    assert taxa.kind == taxonomy.INATURALIST
    assert taxa.ancestors(42) == (1, 10, 21, 31)
    assert taxa.ancestor_at(42, "family") == 21
    assert taxa.ids_named("BOLETUS EDULIS Bull.") == [42]


def test_gbif_backbone_walks_parents_and_maps_synonyms(tmp_path):
  header = ("taxonID\tparentNameUsageID\tacceptedNameUsageID\ttaxonRank\t"
            "scientificName\tcanonicalName\ttaxonomicStatus")
  rows = [
      "5\t\t\tkingdom\tFungi\tFungi\taccepted",
      "8\t5\t\tfamily\tBoletaceae Chevall.\tBoletaceae\taccepted",
      "9\t8\t\tgenus\tBoletus L.\tBoletus\taccepted",
      "11\t9\t\tspecies\tBoletus edulis Bull.\tBoletus edulis\taccepted",
      "12\t9\t11\tspecies\tBoletus bulbosus Schaeff.\tBoletus bulbosus\t"
      "synonym",
  ]
  path = tmp_path / "Taxon.tsv"
  path.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
  taxa = taxonomy.read_taxa(str(path))
  assert taxa.kind == taxonomy.GBIF
  assert taxa.ancestors(11) == (5, 8, 9)
  assert taxa.rank[8] == "family" and taxa.name[8] == "Boletaceae"
  assert taxa.ids_named("Boletus bulbosus") == [11]  # the synonym's taxon
  matched = taxonomy.match_labels(["Boletus edulis", "Boletus bulbosus"], taxa)
  assert matched.label_taxon == (11, 11) and matched.unmatched == ()


def test_a_table_of_other_columns_is_refused(tmp_path):
  path = tmp_path / "other.tsv"
  path.write_text("id\tname\n1\tLife\n", encoding="utf-8")
  with pytest.raises(config.ConfigError, match="--taxa .* has columns"):
    taxonomy.read_taxa(str(path))
  with pytest.raises(config.ConfigError, match="cannot be read"):
    taxonomy.read_taxa(str(tmp_path / "missing.tsv"))


def test_matching_reports_unmatched_and_ambiguous_labels(tmp_path):
  # A second, inactive "Boletus edulis": the active one is taken.
  taxa = taxonomy.read_taxa(_write_inaturalist(
      tmp_path / "taxa.csv", extra=["99\t1/10/21/31\t0\tspecies\t"
                                    "Boletus edulis\tfalse"]))
  matched = taxonomy.match_labels(LABELS, taxa)
  assert matched.label_taxon == (40, 41, 42, 43, None)
  assert matched.unmatched == ("Not a fungus",)
  assert matched.ambiguous == ("Boletus edulis Bull.",)
  assert matched.unmatched_fraction == pytest.approx(0.2, abs=1e-12)
  report = matched.report("taxa.csv")
  assert report["unmatched"] == ["Not a fungus"] and report["matched"] == 4
  assert matched.node_ids == (1, 10, 20, 21, 30, 31, 40, 41, 42, 43)


def _dense_sums(matched, taxa, probabilities):
  """Direct computation: per taxon, the mask of labels under it, summed."""
  mask = np.zeros((len(matched.label_taxon), len(matched.node_ids)))
  for a, node in enumerate(matched.node_ids):
    for l, taxon in enumerate(matched.label_taxon):
      if taxon is not None and (taxon == node or node in taxa.ancestors(taxon)):
        mask[l, a] = 1.0
  return probabilities.astype(np.float64) @ mask


PHOTOS = np.array([
    # Amanita muscaria alone reaches 0.8: it answers for itself.
    [0.85, 0.05, 0.05, 0.03, 0.02],
    # No species does; Amanita = 0.45 + 0.40 = 0.85.
    [0.45, 0.40, 0.05, 0.05, 0.05],
    # Amanitaceae 0.40, Boletaceae 0.50; Fungi = 0.90.
    [0.30, 0.10, 0.25, 0.25, 0.10],
    # 0.6 on the unmatched label: Fungi and Life hold 0.4; no answer.
    [0.10, 0.10, 0.10, 0.10, 0.60],
], np.float32)


def test_rollup_sums_and_chosen_taxa(taxa):
  matched = taxonomy.match_labels(LABELS, taxa, threshold=0.8)
  rollup = taxonomy.RollUp(matched)
  sums = rollup.sums(PHOTOS)
  np.testing.assert_allclose(sums, _dense_sums(matched, taxa, PHOTOS),
                             rtol=0, atol=1e-12)
  got = rollup(PHOTOS)
  chosen = [matched.node_ids[n] if n >= 0 else None for n in got.node]
  assert chosen == [40, 30, 10, None]
  assert [matched.node_ranks[n] for n in got.node[:3]] == [
      "species", "genus", "kingdom"]
  np.testing.assert_allclose(got.score[:3], [0.85, 0.85, 0.90], atol=1e-6)
  assert np.isnan(got.score[3])


def test_rollup_matches_a_direct_computation_on_random_photos(taxa):
  matched = taxonomy.match_labels(LABELS, taxa, threshold=0.7)
  rng = np.random.default_rng(3)
  photos = rng.dirichlet(np.full(len(LABELS), 0.3), 200).astype(np.float32)
  got = taxonomy.RollUp(matched)(photos)
  sums = _dense_sums(matched, taxa, photos)
  depth = np.array(matched.node_depths)
  for i in range(len(photos)):
    reach = np.flatnonzero(sums[i] >= 0.7)
    if not len(reach):
      assert got.node[i] == -1
      continue
    deepest = reach[depth[reach] == depth[reach].max()]
    expected = deepest[np.argmax(sums[i, deepest])]
    assert got.node[i] == expected
    assert got.score[i] == pytest.approx(sums[i, expected], abs=1e-12)


def test_at_half_two_siblings_can_reach_and_the_higher_wins(taxa):
  matched = taxonomy.match_labels(LABELS, taxa, threshold=0.5)
  # Amanita 0.5 and Boletus 0.5 (two genera, the deepest reaching) tie:
  # the lower id (30) is taken; then Boletus at 0.51 beats Amanita at
  # 0.49.
  got = taxonomy.RollUp(matched)(np.array(
      [[0.25, 0.25, 0.25, 0.25, 0.0], [0.3, 0.19, 0.3, 0.21, 0.0]],
      np.float32))
  assert [matched.node_ids[n] for n in got.node] == [30, 31]


def test_no_matched_label_rolls_up_to_nothing(taxa):
  matched = taxonomy.match_labels(["Nothing here"], taxa)
  got = taxonomy.RollUp(matched)(np.ones((2, 1), np.float32))
  assert list(got.node) == [-1, -1] and np.isnan(got.score).all()


def _classifier(labelmap):
  spec = models_lib.REGISTRY["fungi_mobile_v1"]
  return models_lib.ResolvedModel(spec=spec, path="/m", resize=spec.resize,
                                  labelmap_path=labelmap)


def test_attach_refuses_too_many_unmatched_labels(tmp_path):
  path = _write_inaturalist(tmp_path / "taxa.csv")
  model = _classifier("/m/labelmap.csv")
  flags = taxonomy.TaxonomyConfig(taxa=path, max_unmatched_labels=0.1)
  with pytest.raises(config.ConfigError) as error:
    taxonomy.attach([model], flags, lambda m: list(LABELS))
  assert "--max_unmatched_labels 0.1" in str(error.value)
  assert "'Not a fungus'" in str(error.value) and "1 of the 5" in str(
      error.value)
  # At 0.2 the one unmatched label in five is allowed.
  (attached,) = taxonomy.attach(
      [model], taxonomy.TaxonomyConfig(taxa=path, max_unmatched_labels=0.2),
      lambda m: list(LABELS))
  assert attached.label_taxa.label_taxon == (40, 41, 42, 43, None)
  # Without --taxa nothing is read or attached.
  assert taxonomy.attach([model], taxonomy.TaxonomyConfig(), None) == (model,)


@pytest.mark.parametrize("flags", [dict(rollup_threshold=0.0),
                                   dict(rollup_threshold=1.5),
                                   dict(max_unmatched_labels=-0.1)])
def test_bad_flags(flags):
  with pytest.raises(config.ConfigError, match="--"):
    taxonomy.TaxonomyConfig(**flags)


def test_fingerprint_follows_the_labels_taxa(tmp_path, taxa):
  one = taxonomy.match_labels(LABELS, taxa)
  assert one.fingerprint == taxonomy.match_labels(LABELS, taxa).fingerprint
  renamed = [r if r[0] != 30 else (30, r[1], r[2], "Amanitopsis")
             for r in TREE]
  other = taxonomy.match_labels(LABELS, taxonomy.read_taxa(
      _write_inaturalist(tmp_path / "other.csv", renamed)))
  assert other.fingerprint != one.fingerprint
