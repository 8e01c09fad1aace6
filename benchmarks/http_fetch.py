"""Photos over slow HTTP against the same photos on local disk.

    python -m benchmarks.http_fetch [--photos 1000] [--latency 0.1]
        [--hosts 8] [--model_root DIR] [--output benchmarks/http_fetch.json]

Serves ``--photos`` JPEGs from the loopback photo server of the tests
(tests/http_server.py), spread over ``--hosts`` loopback addresses as a GBIF
download spreads over publishers, with ``--latency`` seconds added to every
response; runs natvision-embed on a manifest of their URLs and on a manifest
of the same files on local disk, with the same flags, and reports both
rates (photos per second, from run.json), their ratio, and the peak number
of requests the server saw in progress at once per host (the client's
per-host cap at work).  Tiny stand-in models are written unless
``--model_root`` is given, so the figure is about fetching, not inference.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from typing import Dict, List

from PIL import Image


def _photos(folder: str, count: int) -> Dict[str, bytes]:
  """``count`` distinct 640x480 JPEGs made from the bundled sample photos."""
  from tests.conftest import real_photo_paths  # pylint: disable=import-outside-toplevel
  sources = [Image.open(p).convert("RGB") for p in real_photo_paths()]
  files = {}
  for i in range(count):
    image = sources[i % len(sources)]
    w, h = image.size
    x, y = (i * 7) % max(1, w - 320), (i * 13) % max(1, h - 240)
    crop = image.crop((x, y, x + min(320, w), y + min(240, h)))
    path = os.path.join(folder, f"{i:05d}.jpg")
    crop.resize((640, 480)).save(path, quality=88)
    with open(path, "rb") as f:
      files[f"/photos/{i:05d}.jpg"] = f.read()
  return files


def _manifest(path: str, uris: List[str]) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["uri"])
    writer.writerows([u] for u in uris)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--photos", type=int, default=1000)
  p.add_argument("--latency", type=float, default=0.1)
  p.add_argument("--hosts", type=int, default=8)
  p.add_argument("--model_root")
  p.add_argument("--output", default=os.path.join(
      os.path.dirname(__file__), "http_fetch.json"))
  args, job_flags = p.parse_known_args(argv)

  from natvision.pipelines import embed_images  # pylint: disable=import-outside-toplevel
  from natvision.transforms import standins as standin_models  # pylint: disable=import-outside-toplevel
  from tests.http_server import PhotoServer  # pylint: disable=import-outside-toplevel

  tmp = tempfile.mkdtemp(prefix="natvision-http-bench-")
  photo_dir = os.path.join(tmp, "photos")
  os.makedirs(photo_dir)
  files = _photos(photo_dir, args.photos)
  model_root = args.model_root
  if not model_root:
    model_root = os.path.join(tmp, "models")
    standin_models.write_standins(model_root, tiny=True,
                                  models=["inaturalist_v2"])
  flags = ["--model_root", model_root, "--models", "inaturalist_v2",
           "--runtime", "tf", *job_flags]
  hosts = [f"127.0.0.{i + 1}" for i in range(args.hosts)]
  local = _manifest(os.path.join(tmp, "local.csv"), [
      os.path.join(photo_dir, os.path.basename(k)) for k in sorted(files)])
  local_report = embed_images.run(
      ["--input", local, "--output_dir", os.path.join(tmp, "out_local"),
       *flags])
  with PhotoServer(files, latency=args.latency, hosts=hosts) as server:
    remote = _manifest(os.path.join(tmp, "http.csv"), [
        server.url(k, i % len(hosts)) for i, k in enumerate(sorted(files))])
    http_report = embed_images.run(
        ["--input", remote, "--output_dir", os.path.join(tmp, "out_http"),
         *flags])
    peak = dict(server.peak)
  local_rate = local_report["images_per_second"]
  http_rate = http_report["images_per_second"]
  result = {
      "photos": args.photos, "latency_s": args.latency, "hosts": args.hosts,
      "flags": flags, "local_photos_per_s": local_rate,
      "http_photos_per_s": http_rate,
      "ratio_http_to_local": round(http_rate / local_rate, 3),
      "peak_requests_per_host": max(peak.values()) if peak else 0,
      "peak_by_host": peak,
      "errors": {"local": local_report["errors"]["total"],
                 "http": http_report["errors"]["total"]},
      "cpus": os.cpu_count(),
  }
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  print(json.dumps(result, indent=2, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
