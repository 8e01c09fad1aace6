"""natvision-standins: writes stand-ins of the seed models for tests and demos.

    python -m tools.standins --output_dir /tmp/models [--tiny] \
        [--models inaturalist_v2,fungi_mobile_v1] [--seed 0] [--overwrite]

and then ``--model_root /tmp/models`` in the pipelines.  THE OUTPUTS OF A
STAND-IN MEAN NOTHING (random weights).  What a stand-in is and how it is
built is transforms/standins.py's, where ``natvision-embed --demo`` finds it
too; this is the command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from natvision.transforms import helptext
from natvision.transforms import models as registry
from natvision.transforms import standins
# The writer, for callers that know it as tools.standins.
from natvision.transforms.standins import build_network, write_standin, write_standins

__all__ = ["build_network", "main", "write_standin", "write_standins"]


def parser() -> argparse.ArgumentParser:
  """natvision-standins's flags."""
  p = helptext.ArgumentParser(
      prog="natvision-standins",
      formatter_class=helptext.HelpFormatter,
      description=(
          "Write stand-ins of the seed models (same formats, signatures and "
          "shapes; random weights) for tests and benchmarks, one folder per "
          "model, which --model_root can name: " + standins.MEANINGLESS + "."),
      epilog=helptext.epilog([
          "natvision-standins --output_dir standins          # full size",
          "natvision-standins --output_dir standins --tiny   # for tests"]))
  p.add_argument("--output_dir", required=True,
                 help="local folder; stand-ins go to <output_dir>/<name>/")
  p.add_argument("--tiny", action="store_true",
                 help="small networks instead of the real architectures")
  p.add_argument("--models", default=",".join(standins.STANDINS),
                 help="comma-separated registry names")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the random weights")
  p.add_argument("--overwrite", action="store_true",
                 help="replace stand-ins written earlier")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parser().parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  try:
    write_standins(args.output_dir, tiny=args.tiny, models=names,
                   seed=args.seed, overwrite=args.overwrite, log=print)
  except (registry.ModelError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"NOTE: {standins.MEANINGLESS}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
