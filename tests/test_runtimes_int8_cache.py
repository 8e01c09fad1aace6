"""transforms/runtimes/int8_cache.py: an int8 job reuses a cached int8 file
whose agreement on its own held-out photos passes, and calibrates again only
when none does.

The records are checked on files of their own; the reuse runs the real
decision (``quantize.decide_int8``) on the tiny stand-ins, with the fixtures
of tests/test_runtimes_quantize.py (a fresh cache holding the session's fp32
files, quantizations counted).
"""

import os

import numpy as np
import pytest

from tests.test_runtimes_quantize import (  # noqa: F401  (fixtures)
    _config, _decided, _photos, onnx_cache, quantizations)
from natvision.transforms import runtimes
from natvision.transforms.runtimes import int8_cache
from natvision.transforms.runtimes import int8_file
from natvision.transforms.runtimes import quantize


def _int8_file(folder, name, key):
  path = os.path.join(folder, f"{name}-{key}.int8.onnx")
  with open(path, "wb") as f:
    f.write(b"not read by these tests")
  return path


def test_records_are_per_held_out_sample_and_merge(tmp_path):
  path = _int8_file(str(tmp_path), "m", "a")
  assert int8_cache.recorded(path, "s1") is None
  int8_cache.record(path, "fp", "s1", {"mean_cosine": 0.99}, 8)
  int8_cache.record(path, "fp", "s2", {"mean_cosine": 0.5}, 8)
  assert int8_cache.recorded(path, "s1") == {"mean_cosine": 0.99}
  assert int8_cache.recorded(path, "s2") == {"mean_cosine": 0.5}
  assert int8_cache.recorded(path, "s3") is None


def test_candidates_are_this_models_recorded_files_newest_first(tmp_path):
  folder = str(tmp_path)
  old = _int8_file(folder, "m", "old")
  new = _int8_file(folder, "m", "new")
  other_model = _int8_file(folder, "m", "other")
  _int8_file(folder, "m", "unrecorded")
  for path, fingerprint in ((old, "fp"), (new, "fp"), (other_model, "fp2")):
    int8_cache.record(path, fingerprint, "s", {"x": 1.0}, 1)
  os.utime(old, (1, 1))
  assert int8_cache.candidates("m", "fp", folder) == [new, old]


def test_find_passing_measures_only_unrecorded_files(tmp_path, monkeypatch):
  folder = str(tmp_path)
  monkeypatch.setenv("NATVISION_ONNX_CACHE", folder)
  failing = _int8_file(folder, "m", "failing")
  unmeasured = _int8_file(folder, "m", "unmeasured")
  int8_cache.record(failing, "fp", "s", {"mean_cosine": 0.2}, 8)
  int8_cache.record(unmeasured, "fp", "other sample", {"mean_cosine": 1}, 8)
  os.utime(unmeasured, (1, 1))  # older: tried second
  measured = []

  def measure(path):
    measured.append(path)
    return {"mean_cosine": 0.97}

  found = int8_cache.find_passing("m", "fp", "s", {"mean_cosine": 0.9}, 8,
                                  measure)
  assert found == (unmeasured, {"mean_cosine": 0.97})
  assert measured == [unmeasured]
  # Now recorded: found again without measuring.
  assert int8_cache.find_passing("m", "fp", "s", {"mean_cosine": 0.9}, 8,
                                 measure) == found
  assert measured == [unmeasured]
  assert int8_cache.find_passing("m", "fp", "s", {"mean_cosine": 0.99}, 8,
                                 measure) is None


def _other_photos(n=12):
  """Prepared photos of another job: none of them among ``_photos()``."""
  rng = np.random.default_rng(7)
  first = _photos(n)
  # Half of each photo, half seeded noise: like them, yet other photos.
  photos = [(p // 2 + rng.integers(0, 128, p.shape)).astype(np.uint8)
            for p in first]
  assert not any(np.array_equal(p, q) for p in photos for q in first)
  return photos


def test_another_jobs_photos_reuse_the_int8_file_that_agrees(tiny_models,
                                                             quantizations):
  name = "inaturalist_v2"
  made = quantize.decide_int8(_decided(tiny_models, name), _photos(),
                              _config())
  runtimes.forget()
  again = quantize.decide_int8(_decided(tiny_models, name), _other_photos(),
                               _config())
  assert made.onnx_source == "quantized" and again.onnx_source == "cached"
  assert again.onnx_path == made.onnx_path
  assert quantizations == {name: 1}
  # Measured on the second job's own held-out photos.
  assert again.agreement.held_out == 8
  assert set(again.agreement.figures) == set(made.agreement.figures)


@pytest.mark.slow  # two quantizations; the default tier's
# test_find_passing_measures_only_unrecorded_files covers the rule
def test_a_recorded_agreement_below_the_minimums_calibrates_again(
    tiny_models, quantizations, monkeypatch):
  name = "inaturalist_v2"
  made = quantize.decide_int8(_decided(tiny_models, name), _photos(),
                              _config())
  other = _other_photos()
  _, held_out = quantize.split_sample(other, 4, 8)
  digest = int8_file.array_digest(held_out)
  int8_cache.record(made.onnx_path, made.fingerprint, digest,
                    {k: -1.0 for k in made.agreement.figures}, 8)
  runtimes.forget()
  again = quantize.decide_int8(_decided(tiny_models, name), other, _config())
  assert again.onnx_source == "quantized"
  assert again.onnx_path != made.onnx_path
  assert quantizations == {name: 2}
  # A rerun of that job reads its figures from the record: nothing measured.
  measured = []
  real = quantize.measure_agreement
  monkeypatch.setattr(quantize, "measure_agreement",
                      lambda *a: measured.append(1) or real(*a))
  runtimes.forget()
  rerun = quantize.decide_int8(_decided(tiny_models, name), other, _config())
  assert rerun.onnx_path == again.onnx_path and rerun.onnx_source == "cached"
  assert measured == [] and quantizations == {name: 2}
  assert dict(rerun.agreement.figures) == dict(again.agreement.figures)
