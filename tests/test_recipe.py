"""The species-level recipe of docs/taxonomy.md, end to end, as a user runs
it: a GBIF download (a Darwin Core zip of occurrences with photos on a
web host) and an iNaturalist snapshot's observations ->
``natvision-prior`` -> ``natvision-embed --taxa --prior`` ->
``natvision-evaluate --taxa``, per rank, with and without the prior.

The models are the tiny stand-ins, so the figures mean nothing; what is
checked is that every photo of the download is accounted for in each
table and that each step reads what the one before wrote.
"""
# pylint: disable=redefined-outer-name

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from natvision.pipelines import build_prior, embed_images
from natvision.tools import evaluate
from tests import taxa_helpers
from tests.conftest import real_photo_paths
from tests.dwca_helpers import gbif_zip, server  # noqa: F401

MODEL = "fungi_mobile_v1"
COPENHAGEN = (55.68, 12.57)


def _download(path, server, taxon_of, labels):
  """A GBIF download of one occurrence per photo: half in Copenhagen, half
  on the equator, each identified as one of the stand-in's labels."""
  matched = sorted(taxon_of)
  core, media = [], []
  for i in range(len(real_photo_paths())):
    label = matched[(7 * i) % len(matched)]
    lat, lon = COPENHAGEN if i % 2 == 0 else (0.5, 0.5)
    core.append([1000 + i, f"urn:occ:{i}", labels[label], taxon_of[label],
                 lat, lon, "2024-05-01", "DK", "CC0_1_0", "Ann", "Wood"])
    media.append([1000 + i, "StillImage", "image/jpeg",
                  server.url(f"/img/{i}", i % 2), "", "Ann",
                  "http://creativecommons.org/publicdomain/zero/1.0/", "Ann"])
  gbif_zip(path, core, media)
  return core


@pytest.mark.slow
def test_gbif_download_and_snapshot_to_per_rank_evaluation(
    tmp_path, tiny_models, server):
  taxa = str(tmp_path / "taxa.tsv")
  labels, taxon_of = taxa_helpers.write_standin_taxa(
      os.path.join(tiny_models, MODEL, "labelmap.csv"), taxa)
  download = str(tmp_path / "0012345-240101120000000.zip")
  core = _download(download, server, taxon_of, labels)
  # The snapshot: research-grade observations in Copenhagen of the
  # download's taxa and others, enough for the cell to count.
  rng = np.random.default_rng(3)
  observed = [row[3] for row in core] + [
      int(t) for t in rng.choice(sorted(taxon_of.values()), 30)]
  lines = ["observation_uuid\tlatitude\tlongitude\ttaxon_id\tquality_grade"]
  lines += [f"u{i}\t{COPENHAGEN[0]}\t{COPENHAGEN[1]}\t{t}\tresearch"
            for i, t in enumerate(observed * 3)]
  snapshot = tmp_path / "inat" / "2024-05-27"
  snapshot.mkdir(parents=True)
  (snapshot / "observations.csv").write_text("\n".join(lines) + "\n")

  prior = str(tmp_path / "priors" / "inat-r4.parquet")
  assert build_prior.main(["--observations", str(snapshot),
                           "--output", prior]) == 0
  out = str(tmp_path / "region")
  assert embed_images.main([
      "--input", download, "--output_dir", out, "--models", MODEL,
      "--model_root", tiny_models, "--taxa", taxa, "--prior", prior,
      "--prior_min_observations", "10", "--rollup_threshold", "0.05"]) == 0
  rows = pq.read_table(os.path.join(out, "predictions", MODEL)).to_pylist()
  errors = pq.read_table(os.path.join(out, "errors")).to_pylist()
  assert len(rows) + len(errors) == len(core)
  assert sorted(r["gbifID"] for r in rows + errors) == sorted(
      str(row[0]) for row in core)
  applied = [r for r in rows if r["prior_applied"]]
  assert applied and all(r["decimalLatitude"] == str(COPENHAGEN[0])
                         for r in applied)
  assert all(r["prior_reason"] == "few_observations"
             for r in rows if not r["prior_applied"])

  assert evaluate.main(["--output_dir", out, "--label_column", "taxonKey",
                        "--taxa", taxa, "--k", "1,5"]) == 0
  with open(os.path.join(out, "evaluation.json")) as f:
    entry = json.load(f)["models"][MODEL]
  assert entry["photos"] == len(rows) and entry["skipped"] == 0
  assert set(entry["ranks"]) == {"genus", "family"}
  assert entry["ranks"]["family"]["photos"] == len(rows)
  assert entry["rollup"]["photos"] == len(rows)
  prior_entry = entry["with_prior"]
  assert prior_entry["photos"] == len(rows)
  assert prior_entry["prior_applied"] == len(applied)
  assert set(prior_entry["ranks"]) == {"genus", "family"}
