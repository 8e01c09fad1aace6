"""tools/search.py: natvision-search on the tables of a real job.

The job (tests/conftest.py ``labelled_job``) embedded crops of six photos
with the tiny stand-ins.  Results are compared with a brute-force numpy
ranking of the same table; a ``--photo`` query goes through the job's own
read, decode, prepare and model code and must find the photo's own row.
"""

import json

import numpy as np
import pytest
from PIL import Image

from tests.search_helpers import MODEL, out, read_table as _table  # noqa: F401
from natvision.tools import search


def _brute_force(table, vector, k):
  x = np.array(table.column("embedding").to_pylist(), np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = np.asarray(vector, np.float64) / np.linalg.norm(vector)
  scores = x @ q
  order = np.argsort(-scores, kind="stable")[:k]
  ids = table.column("image_id").to_pylist()
  return [ids[i] for i in order], scores[order]


def _json_lines(text):
  return [json.loads(line) for line in text.strip().splitlines()]


def test_search_by_image_id_returns_itself_first_then_brute_force_order(
    out, capsys):
  table = _table(out)
  target = "s2c1"
  vector = table.column("embedding")[
      table.column("image_id").to_pylist().index(target)].as_py()
  want_ids, want_scores = _brute_force(table, vector, 6)
  assert search.main(["--output_dir", out, "--model", MODEL, "--image_id",
                      target, "--k", "6", "--json"]) == 0
  rows = _json_lines(capsys.readouterr().out)
  assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert rows[0]["image_id"] == target
  assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
  assert [r["image_id"] for r in rows] == want_ids
  np.testing.assert_allclose([r["score"] for r in rows], want_scores,
                             atol=1e-5)
  # Carried columns come with each row, and the crops of the same source
  # photo are the nearest (the stand-ins tell photos apart).
  assert {"uri", "species", "site", "taxon_id"} <= set(rows[0])
  assert all(r["image_id"].startswith("s2") for r in rows[1:4])


def test_text_output_is_a_table_best_first(out, capsys):
  assert search.main(["--output_dir", out, "--model", MODEL, "--image_id",
                      "s0c0", "--k", "3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split()[:4] == ["rank", "image_id", "uri", "score"]
  assert len(lines) == 4
  assert lines[1].split()[1] == "s0c0"
  scores = [float(line.split()[3]) for line in lines[1:]]
  assert scores == sorted(scores, reverse=True)


def test_search_by_photo_embeds_it_as_the_job_did(out, labelled_job, capsys):
  row = next(r for r in labelled_job["photos"].rows if r["image_id"] == "s3c2")
  assert search.main(["--output_dir", out, "--model", MODEL, "--photo",
                      row["uri"], "--k", "3", "--json"]) == 0
  rows = _json_lines(capsys.readouterr().out)
  assert rows[0]["image_id"] == "s3c2"
  # The same pixels through the same code: the very same embedding.
  assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_by_a_new_crop_finds_its_source(out, labelled_job, tmp_path,
                                               capsys):
  from tests.conftest import real_photo_paths  # pylint: disable=import-outside-toplevel
  photo = Image.open(real_photo_paths()[1]).convert("RGB")
  w, h = photo.size
  path = tmp_path / "new crop.png"
  photo.crop((w // 10, h // 5, w * 8 // 10, h * 9 // 10)).save(path)
  assert search.main(["--output_dir", out, "--model", "inception_resnet_v2",
                      "--photo", str(path), "--k", "3", "--json",
                      "--model_root", labelled_job["models"]]) == 0
  rows = _json_lines(capsys.readouterr().out)
  assert [r["image_id"][:2] for r in rows] == ["s1"] * 3
  assert rows[0]["score"] < 0.9999  # not a copy of any row


def test_unreadable_photo_and_classifier_tables_are_refused(out, tmp_path,
                                                           capsys):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not a photo")
  assert search.main(["--output_dir", out, "--model", MODEL, "--photo",
                      str(bad)]) == 2
  assert "decode failed" in capsys.readouterr().err
  assert search.main(["--output_dir", out, "--model", "fungi_mobile_v1",
                      "--image_id", "s0c0"]) == 2
  assert "is a classifier" in capsys.readouterr().err
  assert search.main(["--output_dir", out, "--model", MODEL, "--image_id",
                      "nope"]) == 2
  assert "no row with image_id 'nope'" in capsys.readouterr().err


def test_duplicates_are_the_pairs_above_the_threshold(out, capsys):
  table = _table(out)
  x = np.array(table.column("embedding").to_pylist(), np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  sim = x @ x.T
  ids = table.column("image_id").to_pylist()
  threshold = float(np.quantile(sim[np.triu_indices(len(x), 1)], 0.9))
  want = sorted(((float(sim[i, j]), ids[i], ids[j])
                 for i in range(len(x)) for j in range(i + 1, len(x))
                 if sim[i, j] >= threshold), key=lambda p: -p[0])
  assert search.main(["--output_dir", out, "--model", MODEL, "--duplicates",
                      "--threshold", str(threshold), "--json"]) == 0
  got = _json_lines(capsys.readouterr().out)
  assert len(got) == len(want) > 5
  assert [(g["image_id_a"], g["image_id_b"]) for g in got] == [
      (a, b) for _, a, b in want]
  np.testing.assert_allclose([g["score"] for g in got],
                             [s for s, _, _ in want], atol=1e-5)
