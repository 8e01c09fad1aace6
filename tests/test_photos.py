"""The per-photo stage: reads with retries, and failures by stage."""

import io

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from natvision.transforms import photos
from natvision.transforms import photos_keyed
from natvision.transforms.records import ErrorRecord, ImageRef


def _prepared(out):
  """ReadAndPrepare's branches in one PCollection (small test inputs)."""
  return tuple(out.branches.values()) | "AllPrepared" >> beam.Flatten()


class _Flaky:
  """An opener that fails with a 503 a set number of times."""

  from google.api_core.exceptions import ServiceUnavailable

  def __init__(self, failures, data=b"bytes"):
    self.failures = failures
    self.calls = 0
    self.data = data

  def __call__(self, uri):
    self.calls += 1
    if self.calls <= self.failures:
      raise self.ServiceUnavailable(f"503 backend error for {uri}")
    return io.BytesIO(self.data)


def test_transient_errors_are_retried_with_backoff():
  opener, sleeps = _Flaky(2), []
  data = photos.read_with_retries("/mnt/nfs/x.jpg", 100, attempts=4,
                                  base_delay=1.0, opener=opener,
                                  sleep=sleeps.append)
  assert data == b"bytes" and opener.calls == 3
  assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.5 and 1 <= sleeps[1] <= 3


def test_gives_up_after_bounded_attempts():
  opener = _Flaky(10)
  with pytest.raises(photos.ReadError, match="gave up after 3 attempts"):
    photos.read_with_retries("/mnt/nfs/x.jpg", 100, attempts=3,
                             opener=opener, sleep=lambda s: None)
  assert opener.calls == 3


def test_gs_failures_were_retried_by_the_client_and_are_not_retried_again():
  opener = _Flaky(10)
  with pytest.raises(photos.ReadError, match="503 backend error") as info:
    photos.read_with_retries("gs://b/x.jpg", 100, attempts=3, opener=opener,
                             sleep=lambda s: None)
  assert opener.calls == 1 and info.value.transient


def test_missing_and_oversized_files_are_not_retried(tmp_path):
  calls = []

  def opener(uri):
    calls.append(uri)
    raise FileNotFoundError(uri)

  with pytest.raises(photos.ReadError, match="file not found"):
    photos.read_with_retries("/nope.jpg", 100, opener=opener,
                             sleep=lambda s: None)
  assert len(calls) == 1
  big = tmp_path / "big.jpg"
  big.write_bytes(b"x" * 101)
  with pytest.raises(photos.ReadError, match="--max_file_bytes 100"):
    photos.read_bytes(str(big), 100)


def test_stage_of_each_failure_in_a_pipeline(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  good = tmp_path / "good.png"
  Image.new("RGB", (40, 30), (10, 200, 30)).save(good)
  junk = tmp_path / "junk.jpg"
  junk.write_bytes(b"\x00\x01 not an image")
  big = tmp_path / "big.png"
  Image.new("RGB", (2000, 1000)).save(big)
  refs = [ImageRef(image_id=n, uri=str(tmp_path / f)) for n, f in (
      ("good", "good.png"), ("junk", "junk.jpg"), ("gone", "gone.jpg"),
      ("big", "big.png"))]
  config = photos.PhotoConfig(policies=("center_crop", "squash"),
                              max_pixels=1_000_000, retry_base_delay=0.0)
  with TestPipeline() as p:
    out = p | beam.Create(refs) | photos_keyed.ReadAndPrepare(config)
    ok = _prepared(out) | beam.Map(lambda x: (x.ref.image_id, sorted(x.arrays),
                                            x.arrays["squash"].shape,
                                            x.arrays["squash"].dtype.name))
    errs = out.errors | beam.Map(lambda e: (e.ref.image_id, e.stage))
    assert_that(ok, equal_to([("good", ["center_crop", "squash"],
                               (299, 299, 3), "uint8")]), label="ok")
    assert_that(errs, equal_to([("junk", "decode"), ("gone", "read"),
                                ("big", "decode")]), label="errors")


@pytest.mark.parametrize("threads", [0, 3])
def test_prefetching_pool_keeps_every_photo_and_counts(tmp_path, threads):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  refs = []
  for i in range(23):
    path = tmp_path / f"{i}.png"
    if i % 5 == 0:
      path.write_bytes(b"broken")
    else:
      Image.new("RGB", (20 + i, 30), (i, 2 * i, 3 * i)).save(path)
    refs.append(ImageRef(image_id=str(i), uri=str(path)))
  config = photos.PhotoConfig(policies=("squash",), decode_threads=threads,
                              prefetch=4)
  p = TestPipeline()
  out = p | beam.Create(refs) | photos_keyed.ReadAndPrepare(config)
  ok = _prepared(out) | beam.Map(lambda x: (x.ref.image_id,
                                          int(x.arrays["squash"][0, 0, 1])))
  errs = out.errors | beam.Map(lambda e: e.ref.image_id)
  assert_that(ok, equal_to([(str(i), 2 * i) for i in range(23) if i % 5]),
              label="ok")
  assert_that(errs, equal_to([str(i) for i in range(0, 23, 5)]), label="err")
  result = p.run()
  result.wait_until_finish()
  counters = {c.key.metric.name: c.committed
              for c in result.metrics().query()["counters"]}
  assert counters["photos_prepared"] == 18 and counters["photos_failed"] == 5


_FAILURES_LEFT = {}


class _FlakyStorage:
  """Fails the first two opens of every file with a retryable error."""

  def __call__(self, uri):
    left = _FAILURES_LEFT.setdefault(uri, 2)
    if left:
      _FAILURES_LEFT[uri] = left - 1
      raise ConnectionResetError(f"connection reset reading {uri}")
    return open(uri, "rb")


def test_injected_transient_failures_cost_no_photo(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  refs = []
  for i in range(6):
    path = tmp_path / f"{i}.png"
    Image.new("RGB", (30, 30), (i, 0, 0)).save(path)
    refs.append(ImageRef(image_id=str(i), uri=str(path)))
  _FAILURES_LEFT.clear()
  config = photos.PhotoConfig(policies=("squash",), retry_base_delay=0.001,
                              read_attempts=3)
  p = TestPipeline()
  out = p | beam.Create(refs) | photos_keyed.ReadAndPrepare(config, _FlakyStorage())
  assert_that(_prepared(out) | beam.Map(lambda x: x.ref.image_id),
              equal_to([str(i) for i in range(6)]), label="ok")
  assert_that(out.errors, equal_to([]), label="errors")
  result = p.run()
  result.wait_until_finish()
  retries = [c.committed for c in result.metrics().query()["counters"]
             if c.key.metric.name == "read_retries"]
  assert retries == [12]
  # With one attempt fewer than needed, every photo is a read error.
  _FAILURES_LEFT.clear()
  config = photos.PhotoConfig(policies=("squash",), retry_base_delay=0.001,
                              read_attempts=2)
  with TestPipeline() as p:
    out = p | beam.Create(refs) | photos_keyed.ReadAndPrepare(config, _FlakyStorage())
    assert_that(out.errors | beam.Map(lambda e: (e.stage, "gave up" in e.error)),
                equal_to([("read", True)] * 6))


def _write(path, data):
  path.write_bytes(data)
  return ImageRef(image_id=path.name, uri=str(path))


def test_source_and_decoded_sizes_are_upright_and_kept(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tests import corpus  # pylint: disable=import-outside-toplevel
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 3024x4032, shown 4032x3024
  turned = corpus.quadrant_card((4032, 3024)).transpose(
      Image.Transpose.ROTATE_90)
  buf = io.BytesIO()
  turned.save(buf, "JPEG", quality=80, exif=exif.tobytes())
  rotated = _write(tmp_path / "rotated.jpg", buf.getvalue())
  buf = io.BytesIO()
  Image.new("RGB", (500, 200), (9, 9, 9)).save(buf, "PNG")
  small = _write(tmp_path / "small.png", buf.getvalue())
  config = photos.PhotoConfig(policies=("center_crop",))
  got = {}
  for ref in (rotated, small):
    prepared, _ = photos.read_decode_prepare(ref, config, min_side=342)
    got[ref.image_id] = (prepared.source_width, prepared.source_height,
                         prepared.decoded_width, prepared.decoded_height)
  # Upright, and the JPEG decoded at 1/8 scale in the DCT domain.
  assert got == {"rotated.jpg": (4032, 3024, 504, 378),
                 "small.png": (500, 200, 500, 200)}


def test_camera_raws_fail_at_decode_naming_camera_raw(tmp_path):
  from tests import corpus  # pylint: disable=import-outside-toplevel
  refs = [_write(tmp_path / "a.dng", corpus.camera_raw_tiff(dng=True)),
          _write(tmp_path / "b.NEF", corpus.camera_raw_tiff(
              "NIKON", reduced=False, sub_ifds=False))]
  config = photos.PhotoConfig(policies=("squash",))
  for ref, kind in zip(refs, ("DNG", "NEF")):
    result, _ = photos.read_decode_prepare(ref, config, min_side=299)
    assert isinstance(result, ErrorRecord), ref
    assert result.stage == "decode"
    assert f"unsupported format camera raw ({kind})" in result.error


def test_color_profile_setting_reaches_the_decoder(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tests import corpus  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.new("RGB", (299, 299), (100, 200, 100)).save(
      buf, "PNG", icc_profile=corpus.icc_matrix_profile("test Adobe RGB"))
  ref = _write(tmp_path / "adobe.png", buf.getvalue())
  pixels = {}
  for setting in ("ignore", "srgb"):
    config = photos.PhotoConfig(policies=("squash",), color_profile=setting)
    prepared, _ = photos.read_decode_prepare(ref, config, min_side=299)
    pixels[setting] = prepared.arrays["squash"][150, 150].tolist()
  assert pixels["ignore"] == [100, 200, 100]
  expected = corpus.adobe_rgb_to_srgb([[(100, 200, 100)]])[0, 0]
  assert np.abs(np.array(pixels["srgb"]) - expected).max() <= 1
  with pytest.raises(ValueError, match="--color_profile"):
    photos.PhotoConfig(policies=("squash",), color_profile="p3")
