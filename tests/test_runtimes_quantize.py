"""transforms/runtimes/quantize.py: --precision int8 flags, the decision.

The figures themselves are tests/test_runtimes_agreement.py's; here they
are recomputed from the two files' outputs.  The int8 decision runs on the tiny
stand-ins with synthetic prepared photos; their random weights may quantize
well or badly, so the tests assert what is decided from the figures (refused
below a strict minimum, accepted above a loose one), never a figure's value.
"""

import json
import os
import shutil

import numpy as np
import pytest

from natvision.pipelines import embed_images
from tests.conftest import copy_session_onnx_files
from natvision.transforms import config as config_lib
from natvision.transforms import models as models_lib
from natvision.transforms import runtimes
from natvision.transforms.runtimes import chooser
from natvision.transforms.runtimes import onnx_session
from natvision.transforms.runtimes import onnx_store
from natvision.transforms.runtimes import agreement as agreement_lib
from natvision.transforms.runtimes import int8_file
from natvision.transforms.runtimes import quantize
from tests.report_helpers import table_rows


@pytest.fixture(autouse=True)
def onnx_cache(tiny_models, tmp_path, monkeypatch):
  """A cache of this test's own, holding the session's fp32 files of the
  tiny stand-ins (converted once, see conftest) and no int8 file."""
  cache = copy_session_onnx_files(tmp_path / "onnx_cache")
  monkeypatch.setenv("NATVISION_ONNX_CACHE", cache)
  runtimes.forget()
  yield cache
  runtimes.forget()


@pytest.fixture
def quantizations(monkeypatch):
  """Counts quantizations started by this process, per model name."""
  counts = {}
  quantize_in_child = int8_file.quantize_in_child

  def counting(resolved, *args, **kwargs):
    counts[resolved.name] = counts.get(resolved.name, 0) + 1
    return quantize_in_child(resolved, *args, **kwargs)

  monkeypatch.setattr(int8_file, "quantize_in_child", counting)
  return counts


def _photos(n=12):
  """Varied synthetic prepared photos (noise, ramps, patches, stripes)."""
  return list(runtimes.probe_batch(299, n))


def _decided(root, name):
  (resolved,) = models_lib.resolve_models([name], root,
                                          requested_runtime="onnx")
  return chooser.decided(resolved)


def _config(minimum="0", calibration=4, agreement=8):
  return quantize.QuantizationConfig(
      precision="int8", min_agreement=quantize.parse_minimums(minimum),
      calibration_photos=calibration, agreement_photos=agreement)


def _session_outputs(path, photos, resolved=None):
  """A model file's outputs on one batch: run by onnxruntime directly, or
  (with ``resolved``) by a fresh session opened as the launcher opens it,
  so that the int8 arithmetic (which may vary in the last digits with
  threads and graph options) is the launcher's."""
  if resolved is not None:
    return onnx_session.OnnxSession(resolved, path).predict(photos).astype(
        np.float64)
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  (out,) = session.run(None, {"images": photos.astype(np.float32) / 255.0})
  return out.astype(np.float64)


# --------------------------------------------------------------------------
# Flags.


def test_min_agreement_parses_one_number_or_pairs():
  assert dict(quantize.parse_minimums("")) == quantize.DEFAULT_MINIMUMS
  assert set(dict(quantize.parse_minimums("0.5")).values()) == {0.5}
  pairs = dict(quantize.parse_minimums("top1_agreement=0.9, mean_cosine=1"))
  assert pairs["top1_agreement"] == 0.9 and pairs["mean_cosine"] == 1.0
  assert pairs["p1_cosine"] == quantize.DEFAULT_MINIMUMS["p1_cosine"]
  for bad, match in (("top1=0.9", "names 'top1'"), ("x", "takes a number"),
                     ("top1_agreement", "takes a number")):
    with pytest.raises(config_lib.ConfigError, match=match):
      quantize.parse_minimums(bad)
  with pytest.raises(config_lib.ConfigError, match="between 0 and 1"):
    _config("1.5")
  with pytest.raises(config_lib.ConfigError, match="--precision"):
    quantize.QuantizationConfig(precision="int4")
  with pytest.raises(config_lib.ConfigError, match="--agreement_photos"):
    _config(agreement=1)


def test_int8_flags_reach_the_job_config(tiny_models):
  config, _ = embed_images.parse_args([
      "--input", "x/*.jpg", "--output_dir", "out", "--model_root",
      tiny_models, "--precision", "int8", "--min_agreement",
      "top1_agreement=0.9", "--calibration_photos", "8",
      "--agreement_photos", "16"])
  q = config.embed.quantization
  assert q.int8 and q.minimums["top1_agreement"] == 0.9
  assert (q.calibration_photos, q.agreement_photos, q.sample_size) == (8, 16,
                                                                       24)
  default, _ = embed_images.parse_args([
      "--input", "x/*.jpg", "--output_dir", "out", "--model_root",
      tiny_models])
  assert default.embed.quantization.precision == "fp32"
  with pytest.raises(config_lib.ConfigError, match="not --runtime tf"):
    embed_images.parse_args([
        "--input", "x/*.jpg", "--output_dir", "out", "--model_root",
        tiny_models, "--precision", "int8", "--runtime", "tf"])


# --------------------------------------------------------------------------
# The decision.


def _top_k_set(row, k):
  return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])


@pytest.mark.parametrize("name", ["fungi_mobile_v1", "inaturalist_v2"])
def test_int8_figures_are_measured_on_held_out_photos(tiny_models, name,
                                                      quantizations):
  model = _decided(tiny_models, name)
  photos = _photos(12)
  decision = quantize.decide_int8(model, photos, _config())
  assert decision.runtime == "onnx" and decision.precision == "int8"
  assert decision.onnx_source == "quantized" and quantizations == {name: 1}
  assert decision.onnx_path.endswith(".int8.onnx")
  assert decision.fingerprint == model.decision.fingerprint
  agreement = decision.agreement
  assert (agreement.calibration, agreement.held_out) == (4, 8)
  assert set(agreement.figures) == set(agreement_lib.FIGURES[model.spec.kind])
  # The same figures, with numpy, from the two files' outputs on photos
  # 4..11 (the held-out ones, one batch, as the launcher ran them).
  held = np.stack(photos[4:12])
  fp32 = _session_outputs(model.decision.onnx_path, held, model)
  int8 = _session_outputs(decision.onnx_path, held, model)
  if model.spec.kind == "classifier":
    assert agreement.figures["top1_agreement"] == pytest.approx(
        np.mean(fp32.argmax(1) == int8.argmax(1)))
    assert agreement.figures["top5_overlap"] == pytest.approx(np.mean([
        len(_top_k_set(a, 5) & _top_k_set(b, 5)) / 5
        for a, b in zip(fp32, int8)]))
  else:
    cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b)
               for a, b in zip(fp32, int8)]
    assert agreement.figures["mean_cosine"] == pytest.approx(
        np.mean(cosines), abs=1e-9)
    assert agreement.figures["p1_cosine"] == pytest.approx(
        np.percentile(cosines, 1), abs=1e-9)
  assert json.dumps(decision.as_dict())  # recordable as it is
  # The same photos again: the cached file, no second quantization.
  runtimes.forget()
  again = quantize.decide_int8(_decided(tiny_models, name), photos, _config())
  assert again.onnx_source == "cached" and again.onnx_path == (
      decision.onnx_path)
  assert quantizations == {name: 1}
  assert again.agreement == agreement


def test_a_copied_model_folder_reuses_the_int8_file(tiny_models, tmp_path,
                                                    quantizations):
  name = "fungi_mobile_v1"
  first = tmp_path / "first"
  shutil.copytree(os.path.join(tiny_models, name), first / name)
  # The fp32 file staged next to the model, as natvision-stage-onnx leaves it.
  shutil.copy(_decided(tiny_models, name).decision.onnx_path,
              first / name / onnx_store.STAGED_ONNX)
  copy = tmp_path / "copy"
  shutil.copytree(first, copy)  # cp -r: another path, the same bytes
  photos = _photos(12)
  runtimes.forget()
  model = _decided(str(first), name)
  assert model.decision.onnx_source == "staged"
  made = quantize.decide_int8(model, photos, _config())
  runtimes.forget()
  copied = _decided(str(copy), name)
  assert copied.decision.onnx_path == str(copy / name / onnx_store.STAGED_ONNX)
  again = quantize.decide_int8(copied, photos, _config())
  assert made.onnx_source == "quantized" and again.onnx_source == "cached"
  assert again.onnx_path == made.onnx_path
  assert quantizations == {name: 1}


def test_a_strict_minimum_refuses_naming_the_model_and_figure(tiny_models):
  model = _decided(tiny_models, "inaturalist_v2")
  with pytest.raises(models_lib.ModelError) as raised:
    quantize.decide_int8(model, _photos(12), _config("mean_cosine=1"))
  message = str(raised.value)
  assert message.startswith("model inaturalist_v2: int8 mean_cosine 0.")
  assert "below --min_agreement mean_cosine=1.0" in message
  assert "8 held-out photos" in message


def test_workers_open_the_checked_int8_file_and_only_it(tiny_models,
                                                        tmp_path):
  model = _decided(tiny_models, "fungi_mobile_v1")
  decision = quantize.decide_int8(model, _photos(12), _config(),
                                  publish_dir=str(tmp_path / "published"))
  assert os.path.dirname(decision.onnx_path) == str(tmp_path / "published")
  decided = model.with_decision(decision)
  batch = np.stack(_photos(5))
  # In the launcher's process: the launcher's session, taken over.
  worker = runtimes.for_model(decided)
  worker.load()
  assert worker.precision == "int8" and worker.path == decision.onnx_path
  expected = _session_outputs(decision.onnx_path, batch, model)
  np.testing.assert_allclose(worker.predict(batch), expected, atol=1e-6)
  # In another process: the file the decision names, opened and matched.
  runtimes.forget()
  elsewhere = runtimes.for_model(decided)
  elsewhere.load()
  assert elsewhere.describe()["precision"] == "int8"
  np.testing.assert_allclose(elsewhere.predict(batch), expected, atol=1e-6)
  # Not the file it checked (the fp32 one in its place): refused.
  runtimes.forget()
  wrong = model.with_decision(
      decision.__class__(**dict(decision.__dict__,
                                onnx_path=model.decision.onnx_path)))
  with pytest.raises(models_lib.ModelError, match="not the int8 file"):
    runtimes.for_model(wrong).load()


# --------------------------------------------------------------------------
# The whole job.


def test_int8_job_refuses_below_the_minimum_with_exit_2(tiny_models,
                                                        photo_dir, tmp_path,
                                                        capsys):
  status = embed_images.main([
      "--input", str(photo_dir / "*"), "--output_dir", str(tmp_path / "out"),
      "--models", "inaturalist_v2", "--model_root", tiny_models,
      "--precision", "int8", "--min_agreement", "1",
      "--calibration_photos", "3", "--agreement_photos", "4"])
  assert status == 2
  err = capsys.readouterr().err
  assert "model inaturalist_v2: int8 mean_cosine" in err
  assert "below --min_agreement mean_cosine=1.0" in err
  assert not os.path.exists(tmp_path / "out" / "embeddings")


# Slow tier: a whole int8 job on two models; the default tier runs the
# int8 job that is refused and the decision's figures.
@pytest.mark.slow
def test_int8_job_records_the_agreement(tiny_models, photo_dir, tmp_path):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from natvision.transforms import sinks  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "out")
  report = embed_images.run([
      "--input", str(photo_dir / "*"), "--output_dir", out,
      "--models", "fungi_mobile_v1,inaturalist_v2", "--model_root",
      tiny_models, "--precision", "int8", "--min_agreement", "0",
      "--calibration_photos", "3", "--agreement_photos", "4",
      "--runtime", "onnx"])
  assert report["model_loads"] == {"fungi_mobile_v1": 1, "inaturalist_v2": 1}
  recorded = report["models"]
  for name, kind in (("fungi_mobile_v1", "predictions"),
                     ("inaturalist_v2", "embeddings")):
    model = recorded[name]
    assert model["runtime"] == "onnx" and model["precision"] == "int8"
    agreement = model["agreement"]
    # 7 photos picked, one of them the unreadable broken.jpg.
    assert agreement["calibration"] == 3 and agreement["held_out"] == 3
    assert set(agreement["figures"]) == set(
        agreement_lib.FIGURES["classifier" if kind == "predictions"
                         else "embedder"])
    table_dir = os.path.join(out, kind, name)
    schema = pq.read_schema(os.path.join(table_dir, sorted(
        os.listdir(table_dir))[0]))
    meta = json.loads(schema.metadata[sinks.METADATA_KEY])
    assert meta["model"]["precision"] == "int8"
    assert meta["model"]["agreement"] == agreement
    assert pq.read_table(table_dir).num_rows == table_rows(report)[
        f"{kind}/{name}"] > 0


def test_jobs_that_cannot_list_photos_before_the_run_refuse_int8():
  from natvision.pipelines import ingest_observations  # pylint: disable=import-outside-toplevel
  job = ingest_observations.IngestJob()
  with pytest.raises(config_lib.ConfigError,
                     match="natvision-ingest does not offer --precision int8"):
    job.sample_photos(None, None, 96)
