"""transforms/prior.py: the geographic prior's arithmetic and its table.

Hand-computable cases: observations in a few H3 cells at resolution 4,
photos placed in them by coordinates, and the formula of docs/prior.md
computed directly here with numpy from the same counts, to 1e-6.
"""

import argparse
import dataclasses

import h3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from natvision.transforms import models as models_lib
from natvision.transforms import prior
from natvision.transforms import taxonomy

RES = 4
COPENHAGEN = (55.68, 12.57)
STOCKHOLM = (59.33, 18.06)
A = h3.latlng_to_cell(*COPENHAGEN, RES)
B = h3.latlng_to_cell(*STOCKHOLM, RES)
# A neighbour of A with one observation (under the minimum below).
C = sorted(set(h3.grid_disk(A, 1)) - {A})[0]
# Labels 0..3: taxa 10, 20, unmatched, 30.  Taxon 99 is no label's.
LABEL_TAXON = (10, 20, None, 30)
OBSERVED = {(10, A): 8, (20, A): 2, (99, A): 50,
            (20, B): 6, (30, B): 1,
            (30, C): 1}
ALPHA, MIN_OBS = 0.5, 5


def _table(counts=OBSERVED, resolution=RES):
  rows = sorted(counts.items())
  return pa.Table.from_pydict(
      {"taxon_id": [t for (t, _), _ in rows],
       "h3_cell": [c for (_, c), _ in rows],
       "n": [n for _, n in rows]},
      schema=prior.prior_schema({"resolution": resolution,
                                 "source": "test"}))


def _write(path, counts=OBSERVED, resolution=RES):
  pq.write_table(_table(counts, resolution), str(path))
  return str(path)


def _settings(path="unused", alpha=ALPHA, min_obs=MIN_OBS):
  return prior.PriorSettings(path=path, fingerprint="f" * 32,
                             resolution=RES, smoothing=alpha,
                             min_observations=min_obs)


def _direct(p, cell, alpha=ALPHA):
  """The formula, straight from OBSERVED (labels' taxa only)."""
  labels = len(LABEL_TAXON)
  taxa = {t for t in LABEL_TAXON if t is not None}
  in_cell = np.array([OBSERVED.get((t, cell), 0) if t is not None else 0
                      for t in LABEL_TAXON], float)
  n_cell = sum(n for (t, c), n in OBSERVED.items() if c == cell and t in taxa)
  overall = np.array([sum(n for (u, _), n in OBSERVED.items() if u == t)
                      if t is not None else 0 for t in LABEL_TAXON], float)
  n_all = sum(n for (t, _), n in OBSERVED.items() if t in taxa)
  p_cell = (in_cell + alpha) / (n_cell + alpha * labels)
  p_t = (overall + alpha) / (n_all + alpha * labels)
  q = np.asarray(p, float) * p_cell / p_t
  return q / q.sum()


def _extra(lat, lon, names=("decimalLatitude", "decimalLongitude")):
  return ((names[0], lat), (names[1], lon))


def test_place_of_reads_darwin_core_then_snapshot_columns():
  assert prior.place_of(_extra(*COPENHAGEN), RES) == (A, None)
  # Text values (a manifest's), and iNaturalist's names.
  assert prior.place_of(_extra("59.33", "18.06", ("latitude", "longitude")),
                        RES) == (B, None)
  # Darwin Core wins when both are there.
  both = _extra(*COPENHAGEN) + _extra(*STOCKHOLM, ("latitude", "longitude"))
  assert prior.place_of(both, RES) == (A, None)
  # Empty Darwin Core values fall back to the snapshot's.
  empty = _extra("", None) + _extra(*STOCKHOLM, ("latitude", "longitude"))
  assert prior.place_of(empty, RES) == (B, None)
  for missing in ((), _extra(None, None), _extra(float("nan"), 12.0),
                  _extra("north", "east"), (("decimalLatitude", 55.0),)):
    assert prior.place_of(missing, RES) == (None, prior.NO_COORDINATES)
  assert prior.place_of(_extra(95.0, 10.0), RES) == (
      None, prior.INVALID_COORDINATES)
  assert prior.place_of(_extra(10.0, -181.0), RES) == (
      None, prior.INVALID_COORDINATES)


def test_adjusted_scores_match_the_formula_and_the_fallbacks():
  lookup = prior.PriorLookup(_settings(), LABEL_TAXON, table=_table())
  p = np.array([[0.4, 0.3, 0.2, 0.1],
                [0.1, 0.2, 0.3, 0.4],
                [0.25, 0.25, 0.25, 0.25],
                [0.7, 0.1, 0.1, 0.1],
                [0.1, 0.1, 0.1, 0.7],
                [0.3, 0.3, 0.2, 0.2]], np.float32)
  extras = [_extra(*COPENHAGEN),                      # A: applied
            _extra(*STOCKHOLM, ("latitude", "longitude")),  # B: applied
            _extra(*h3.cell_to_latlng(C)),            # C: 1 < 5 observations
            _extra(0.0, 0.0),                         # no observations at all
            (("uri_note", "x"),),                     # no coordinates
            _extra(-91, 0)]                           # invalid
  got = lookup.adjust(p, extras)
  np.testing.assert_allclose(got.probabilities[0], _direct(p[0], A),
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(got.probabilities[1], _direct(p[1], B),
                             rtol=0, atol=1e-6)
  assert got.applied.tolist() == [True, True, False, False, False, False]
  assert got.reasons == [None, None, prior.FEW_OBSERVATIONS,
                         prior.FEW_OBSERVATIONS, prior.NO_COORDINATES,
                         prior.INVALID_COORDINATES]
  # Taxon 99 is no label's: not in N(A).
  assert got.cell_observations.tolist() == [10, 7, 1, 0, -1, -1]
  assert got.cells[:3] == [A, B, C] and got.cells[4:] == [None, None]
  # The photos it does not apply to keep their image scores exactly.
  np.testing.assert_array_equal(got.probabilities[2:], p[2:].astype(float))
  np.testing.assert_allclose(got.probabilities.sum(axis=1), 1.0, atol=1e-9)
  # The prior moves mass toward what is observed there: taxon 10 in A.
  assert got.probabilities[0, 0] > p[0, 0]


def test_a_minimum_of_zero_applies_the_prior_in_an_unseen_cell():
  """An unseen cell gives p(t|c) = 1/T for all: the image scores divided by
  p(t), renormalised (rare taxa gain)."""
  lookup = prior.PriorLookup(_settings(min_obs=0), LABEL_TAXON,
                             table=_table())
  p = np.array([[0.25, 0.25, 0.25, 0.25]])
  got = lookup.adjust(p, [_extra(0.0, 0.0)])
  assert got.applied.tolist() == [True]
  np.testing.assert_allclose(got.probabilities[0], _direct(p[0], "none"),
                             rtol=0, atol=1e-6)


def test_smoothing_changes_the_scores_as_the_formula_says():
  p = np.array([[0.4, 0.3, 0.2, 0.1]])
  for alpha in (0.01, 1.0, 100.0):
    lookup = prior.PriorLookup(_settings(alpha=alpha), LABEL_TAXON,
                               table=_table())
    got = lookup.adjust(p, [_extra(*COPENHAGEN)])
    np.testing.assert_allclose(got.probabilities[0],
                               _direct(p[0], A, alpha), rtol=0, atol=1e-6)


def test_observed_near_looks_at_the_cell_and_its_ring():
  lookup = prior.PriorLookup(_settings(), LABEL_TAXON, table=_table())
  assert lookup.observed_near(A, 0)          # taxon 10 in A itself
  assert lookup.observed_near(A, 3)          # taxon 30 in C, A's neighbour
  assert not lookup.observed_near(B, 0)      # taxon 10 nowhere near B
  assert not lookup.observed_near(A, 2)      # an unmatched label
  far = h3.latlng_to_cell(0.0, 0.0, RES)
  assert not any(lookup.observed_near(far, l) for l in range(4))


def test_the_lookup_reads_its_table_from_the_settings_path(tmp_path):
  path = _write(tmp_path / "prior.parquet")
  lookup = prior.PriorLookup(_settings(path), LABEL_TAXON)
  assert lookup.cell_observations(A) == 10
  assert lookup.taxon_totals.tolist() == [8, 8, 0, 2]
  assert lookup.total == 18


def test_settings_fingerprint_the_file_and_read_its_resolution(tmp_path):
  one = prior.settings_for(_write(tmp_path / "a.parquet"), 0.5, 3,
                           LABEL_TAXON)
  assert one.resolution == RES and one.smoothing == 0.5
  assert one.min_observations == 3 and len(one.fingerprint) == 32
  assert one.source == "test"
  same = prior.settings_for(_write(tmp_path / "b.parquet"))
  assert same.fingerprint == one.fingerprint  # same content, other path
  more = dict(OBSERVED)
  more[(10, B)] = 1
  other = prior.settings_for(_write(tmp_path / "c.parquet", more))
  assert other.fingerprint != one.fingerprint


def test_a_table_of_other_taxa_or_shape_is_refused(tmp_path):
  path = _write(tmp_path / "p.parquet")
  with pytest.raises(prior.PriorError, match="counts none of the 2 taxa"):
    prior.settings_for(path, label_taxon=(1, 2))
  bad = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"taxon_id": [1], "n": [2]}), str(bad))
  with pytest.raises(prior.PriorError, match="lacks column.*h3_cell"):
    prior.settings_for(str(bad))
  bare = tmp_path / "bare.parquet"
  pq.write_table(pa.table({"taxon_id": [1], "h3_cell": [A], "n": [2]}),
                 str(bare))
  with pytest.raises(prior.PriorError, match="no H3 resolution"):
    prior.settings_for(str(bare))
  with pytest.raises(prior.PriorError, match="cannot be read"):
    prior.settings_for(str(tmp_path / "missing.parquet"))


def test_flags_and_their_checks():
  parser = argparse.ArgumentParser()
  prior.PriorConfig.add_flags(parser)
  got = prior.PriorConfig.from_args(parser.parse_args(
      ["--prior", "p.parquet", "--prior_smoothing", "2",
       "--prior_min_observations", "0"]))
  assert got == prior.PriorConfig("p.parquet", 2.0, 0)
  assert prior.PriorConfig.from_args(parser.parse_args([])) == (
      prior.PriorConfig(None, prior.DEFAULT_SMOOTHING,
                        prior.DEFAULT_MIN_OBSERVATIONS))
  for bad in (dict(smoothing=0.0), dict(smoothing=float("inf")),
              dict(min_observations=-1)):
    with pytest.raises(prior.PriorError):
      prior.PriorConfig("p", **bad)


def test_attach_needs_taxa_and_sets_the_classifiers_prior(tmp_path):
  path = _write(tmp_path / "p.parquet")
  models = models_lib.resolve_models(["inaturalist_v2", "fungi_mobile_v1"],
                                     "/m")
  config = prior.PriorConfig(path, ALPHA, MIN_OBS)
  assert prior.attach(models, prior.PriorConfig()) == tuple(models)
  with pytest.raises(prior.PriorError, match="needs --taxa"):
    prior.attach(models, config)
  with pytest.raises(prior.PriorError, match="names none"):
    prior.attach(models[:1], config)
  taxa = taxonomy.Taxa(kind=taxonomy.INATURALIST, rank={10: "species"},
                       name={10: "Amanita muscaria"}, ancestry={10: ()})
  with_taxa = [dataclasses.replace(m, label_taxa=taxonomy.match_labels(
      ["Amanita muscaria", "Nothing here"], taxa))
               if m.spec.kind == "classifier" else m for m in models]
  got = prior.attach(with_taxa, config)
  assert got[0].prior is None  # the embedder
  assert got[1].prior.path == path and got[1].prior.smoothing == ALPHA
  assert got[1].prior.min_observations == MIN_OBS
