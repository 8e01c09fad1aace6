"""benchmarks/scale.py's pieces: the host farm, the inputs it makes, the
first-open watch, the cost arithmetic; no timing is asserted."""

import os
import socket
import urllib.request

from benchmarks import scale


def test_the_farm_serves_any_name_on_every_host_and_one_hangs(tmp_path):
  photos = scale.make_photos(2)
  assert photos == scale.make_photos(2) and photos[0] != photos[1]
  with scale.Farm(3, photos, dead=True) as farm:
    bases = farm.bases()
    assert len(bases) == 4 and len({b.rsplit(":", 1)[0] for b in bases}) == 4
    assert all(b.startswith("http://127.0.0.") for b in bases)
    for i, base in enumerate(bases[:3]):
      with urllib.request.urlopen(f"{base}/p/{i:08d}.jpg", timeout=5) as r:
        assert r.read() == photos[i % 2]
    assert farm.requests() == 3
    host, port = bases[3][len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
      conn.sendall(b"GET /p/1.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
      conn.settimeout(0.3)
      try:
        assert conn.recv(1) == b""  # nothing comes back
      except socket.timeout:
        pass
    manifest = scale.write_manifest(str(tmp_path / "m.csv"), bases, 10)
  with open(manifest) as f:
    lines = f.read().splitlines()
  assert lines[0] == "uri" and len(lines) == 11
  assert lines[5] == f"{bases[0]}/p/00000004.jpg"  # round-robin


def test_glob_links_and_the_first_open_watch(tmp_path):
  folder = str(tmp_path / "g")
  pattern = scale.make_glob(folder, 7, scale.make_photos(2))
  assert pattern == os.path.join(folder, "*.jpg")
  names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
  assert len(names) == 7
  assert os.stat(os.path.join(folder, names[0])).st_nlink == 4 + 1
  scale.make_glob(folder, 9, scale.make_photos(2))  # adds the missing two
  assert len([n for n in os.listdir(folder) if n.endswith(".jpg")]) == 9
  watch = scale.FirstOpen(folder)
  try:
    os.listdir(folder)  # the folder itself opened: not a photo
    assert not watch.poll()
    with open(os.path.join(folder, names[3]), "rb"):
      pass
    assert watch.poll() and watch.first_ts is not None
  finally:
    watch.close()


def _row(cpu_s, rss, n):
  return {"cpu_s": cpu_s, "peak_rss_mib": rss,
          "core_ms_per_photo": cpu_s / n * 1000}


def test_cost_ratios_are_judged_from_ten_thousand_photos():
  flat = scale.cost_summary({"1000": _row(12.0, 900, 1000),
                             "10000": _row(45.0, 920, 10_000),
                             "100000": _row(400.0, 930, 100_000)})
  assert flat["core_ms_ratio_from_10000_to_100000"] == round(4.0 / 4.5, 3)
  assert flat["rss_ratio_from_10000_to_100000"] == round(930 / 920, 3)
  assert flat["flat"] is True
  assert flat["ratio_largest_to_smallest"] == round(4.0 / 12.0, 3)
  assert flat["marginal_core_ms_per_photo"] == [round(33 / 9, 3),
                                                round(355 / 90, 3)]
  assert flat["marginal_rss_mib_per_photo"] == [round(20 / 9000, 5),
                                                round(10 / 90_000, 5)]
  growing = scale.cost_summary({"10000": _row(45.0, 13_680, 10_000),
                                "30000": _row(140.0, 40_000, 30_000)})
  assert growing["flat"] is False
  assert "flat" not in scale.cost_summary({"1000": _row(12.0, 900, 1000),
                                           "10000": _row(45.0, 920, 10_000)})
