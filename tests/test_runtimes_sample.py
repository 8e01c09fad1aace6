"""transforms/runtimes/sample.py: the job's photos the launcher reads for int8.

The sample is spread over the input (first and last included) and read,
decoded and prepared as the job does; a photo that cannot be read is left
out.  Photos are a few small PNGs of one colour each, written here, so the
prepared arrays are known exactly.
"""

import os

import numpy as np
from PIL import Image

from natvision.transforms import photos as photos_lib
from natvision.transforms import sources
from natvision.transforms.runtimes import sample


def test_the_sample_is_spread_over_the_input(tmp_path):
  assert sample.evenly_spaced(list(range(10)), 4) == [0, 3, 6, 9]
  assert sample.evenly_spaced([1, 2], 5) == [1, 2]
  for i in range(10):
    (tmp_path / f"p{i}.jpg").write_bytes(b"")
  refs = sample.pick(3, patterns=[str(tmp_path / "*.jpg")])
  assert [os.path.basename(r.uri) for r in refs] == ["p0.jpg", "p4.jpg",
                                                      "p9.jpg"]


def test_evenly_spaced_keeps_the_order_and_the_ends():
  assert sample.evenly_spaced("abcdefg", 3) == ["a", "d", "g"]
  assert sample.evenly_spaced("abcdefg", 1) == ["a"]
  assert sample.evenly_spaced([], 4) == []


def test_prepare_reads_as_the_job_does_and_leaves_out_failures(tmp_path):
  red, blue = str(tmp_path / "red.png"), str(tmp_path / "blue.png")
  Image.new("RGB", (64, 48), (200, 10, 10)).save(red)
  Image.new("RGB", (40, 40), (10, 10, 200)).save(blue)
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a photo")
  config = photos_lib.PhotoConfig(policies=("squash", "center_crop"), size=32,
                                  decode_threads=0)
  prepared = sample.prepare(
      [sources.ref_for_uri(p) for p in (red, str(broken), blue)], config)
  assert sorted(prepared) == ["center_crop", "squash"]
  for arrays in prepared.values():
    assert [a.shape for a in arrays] == [(32, 32, 3)] * 2
    assert all(a.dtype == np.uint8 for a in arrays)
    # One colour in, the same colour out (the broken file left out).
    np.testing.assert_array_equal(arrays[0], np.full((32, 32, 3),
                                                     (200, 10, 10), np.uint8))
    np.testing.assert_array_equal(arrays[1], np.full((32, 32, 3),
                                                     (10, 10, 200), np.uint8))
