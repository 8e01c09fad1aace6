"""A few dozen of the job's own photos, read by the launcher for int8.

``--precision int8`` calibrates the quantization on photos of the job and
checks it against fp32 on others (transforms/runtimes/quantize.py).  Before
the pipeline exists, the launcher picks them from the job's input and reads,
decodes and prepares them exactly as the job will (``transforms.photos``):

* ``pick``: evenly spaced over the input's photos (sorted by URI for glob
  patterns, in file order for a manifest's first rows), so that one folder
  or one day of photos does not make up the whole sample;
* ``prepare``: the picked photos through read, decode and prepare, a few
  at a time; a photo that fails is left out (the job will report it).
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems

from natvision.transforms import decode as decode_lib
from natvision.transforms import photos as photos_lib
from natvision.transforms import sources
from natvision.transforms.records import ImageRef, PreparedImage

# Rows of a manifest the sample is picked from (read before the job runs).
MANIFEST_ROWS = 2000
READ_THREADS = 8


def evenly_spaced(items: Sequence, count: int) -> list:
  """``count`` items spread over ``items`` (all when there are fewer),
  first and last included, in their order."""
  n = len(items)
  if count >= n:
    return list(items)
  if count == 1:
    return [items[0]]
  return [items[round(i * (n - 1) / (count - 1))] for i in range(count)]


def pick(count: int, patterns: Sequence[str] = (),
         manifest: Optional[sources.Manifest] = None) -> List[ImageRef]:
  """Up to ``count`` photos of the input, evenly spread.

  Args:
    count: photos wanted.
    patterns: the job's glob patterns (when there is no manifest).
    manifest: the job's checked manifest.

  Returns:
    One ImageRef per photo picked.
  """
  if manifest is not None:
    uris = sources.sample_uris(manifest, limit=max(MANIFEST_ROWS, count))
    return [sources.ref_for_uri(u) for u in evenly_spaced(
        list(dict.fromkeys(uris)), count)]
  paths = set()
  for result in FileSystems.match(list(patterns)):
    paths.update(m.path for m in result.metadata_list)
  return [sources.ref_for_uri(p) for p in evenly_spaced(sorted(paths), count)]


def prepare(refs: Sequence[ImageRef], config: photos_lib.PhotoConfig
            ) -> Dict[str, List[np.ndarray]]:
  """Reads, decodes and prepares photos as the job does.

  Args:
    refs: the photos.
    config: the job's photo settings (preparations, size, limits, fetch).

  Returns:
    For each preparation policy of ``config``, the uint8 ``[size, size,
    3]`` arrays of the photos that could be read, in ``refs`` order.
  """
  min_side = decode_lib.decoded_size_needed(config.policies, config.size)

  def one(ref):
    return photos_lib.read_decode_prepare(ref, config, min_side)[0]

  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    outcomes = list(pool.map(one, refs))
  prepared = [o for o in outcomes if isinstance(o, PreparedImage)]
  if len(prepared) < len(outcomes):
    logging.warning("%d of the %d sample photos could not be read; left out",
                    len(outcomes) - len(prepared), len(outcomes))
  return {policy: [p.arrays[policy] for p in prepared]
          for policy in config.policies}
