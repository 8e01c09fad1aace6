"""build_prior: observations in, the geographic prior's table out.

    natvision-prior --observations gs://my-bucket/inat/2024-05-27 \\
        --output gs://my-bucket/priors/inat-2024-05-27-r4.parquet \\
        [--resolution 4] [--quality_grade research] [Beam flags]

    natvision-prior --observations 0012345-240101120000000.zip \\
        --output priors/gbif-r4.parquet --taxon_column speciesKey

The graph: read the observations (an iNaturalist snapshot's observations
table, or a GBIF download's occurrences; transforms/prior_counts.py), key
each kept row by ``(taxon_id, h3_cell)`` at ``--resolution``, count the
keys (``Count.PerElement``) and the skipped rows by reason, and write one
Parquet file (``taxon_id``, ``h3_cell``, ``n``; metadata ``resolution``,
``source``, ``input``, ``taxon_column``, ``quality_grades`` and the counts)
in the last step.  ``natvision-embed --prior`` and ``natvision-ingest
--prior`` read it (transforms/prior.py, docs/prior.md).  Every taxon is
kept: the classifier's taxa are picked when the prior is applied.

The rows are gathered on one worker to write the file: a table of a few
million (taxon, cell) rows is tens of MB.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from natvision import transforms
from natvision.pipelines import launch
from natvision.transforms import console
from natvision.transforms import helptext
from natvision.transforms import prior as prior_lib
from natvision.transforms import prior_counts
from natvision.transforms import storage
from natvision.transforms.config import ConfigError

NAME = "natvision-prior"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=NAME, formatter_class=helptext.HelpFormatter,
      description="Count research-grade observations per taxon and H3 "
      "cell, from an iNaturalist snapshot's observations table or a GBIF "
      "download's occurrences, into the geographic prior's Parquet table "
      "(taxon_id, h3_cell, n) that natvision-embed --prior and "
      "natvision-ingest --prior read (docs/prior.md).",
      epilog=helptext.epilog([
          "natvision-prior --observations inat/2024-05-27 "
          "--output priors/inat-r4.parquet",
          "natvision-prior --observations 0012345-240101120000000.zip "
          "--output priors/gbif-r4.parquet --taxon_column speciesKey",
      ], beam=True))
  p.add_argument("--observations",
                 help="an iNaturalist snapshot folder (its observations "
                 "table), or a GBIF download: its zip as downloaded, its "
                 "occurrence.txt, the folder holding it, or a glob of such "
                 "files")
  p.add_argument("--output", help="the prior table to write (.parquet)")
  p.add_argument("--resolution", type=int,
                 default=prior_lib.DEFAULT_RESOLUTION,
                 help="H3 resolution of the cells, 0-15 (4: about "
                 "1,770 km² a cell)")
  p.add_argument("--quality_grade",
                 default=",".join(prior_counts.DEFAULT_QUALITY_GRADES),
                 help="iNaturalist quality grades counted (comma-separated)")
  p.add_argument("--taxon_column",
                 help="the column read as the taxon id (default: taxon_id "
                 "for iNaturalist, taxonKey for GBIF)")
  launch.add_console_flags(p)
  helptext.mark_required(p, "--observations")
  helptext.mark_required(p, "--output")
  return p


def parse_args(argv: Optional[Sequence[str]] = None
               ) -> Tuple[argparse.Namespace, PipelineOptions]:
  """Parses application and Beam flags; no I/O.

  Raises:
    ConfigError: a missing or bad flag, named.
  """
  args, options = launch.split_beam_args(_parser(), argv)
  if not args.observations:
    raise ConfigError("--observations is required (a snapshot folder or a "
                      "GBIF occurrence.txt)")
  if not args.output:
    raise ConfigError("--output is required (a .parquet path)")
  if not 0 <= args.resolution <= 15:
    raise ConfigError(f"--resolution is an H3 resolution, 0 to 15, not "
                      f"{args.resolution}")
  grades = tuple(g.strip() for g in args.quality_grade.split(",")
                 if g.strip())
  if not grades:
    raise ConfigError("--quality_grade names no grade (e.g. research)")
  args.quality_grades = grades
  return args, options


def _write(_, counts, skipped, output: str, metadata: dict) -> str:
  storage.write_bytes(output, prior_counts.table_bytes(counts, skipped,
                                                       metadata))
  return output


def build(p: beam.Pipeline, observations: prior_counts.Observations,
          output: str, resolution: int, input_path: str) -> None:
  """Adds the counting graph to ``p`` (module docstring)."""
  keyed = (p
           | "ReadObservations" >> prior_counts.ReadObservations(observations)
           | "Key" >> beam.ParDo(prior_counts.CountKeysFn(
               observations, resolution)).with_outputs(
                   prior_counts.SKIPPED_TAG, main="keys"))
  counts = keyed.keys | "Count" >> beam.combiners.Count.PerElement()
  skipped = (keyed[prior_counts.SKIPPED_TAG]
             | "CountSkipped" >> beam.combiners.Count.PerElement())
  metadata = {"resolution": resolution, "source": observations.source,
              "input": input_path, "taxon_column": observations.taxon_column,
              "quality_grades": (list(observations.quality_grades)
                                 if observations.source ==
                                 prior_counts.INATURALIST else None),
              "version": transforms.__version__}
  _ = (p
       | "Once" >> beam.Create([None])
       | "WriteTable" >> beam.Map(_write, beam.pvalue.AsList(counts),
                                  beam.pvalue.AsList(skipped), output,
                                  metadata))


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> dict:
  """Runs the job; returns the table's metadata (its counts), or, when the
  job runs on without this process (a template launch), its state.

  Raises:
    ConfigError: bad flags or observations, before the pipeline starts.
    storage.StorageError: a read or the write failed.
  """
  args, options = parse_args(argv)
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  FileSystems.set_options(options)
  observations = prior_counts.find_observations(
      args.observations, args.taxon_column, args.quality_grades)
  p = test_pipeline or beam.Pipeline(options=options)
  build(p, observations, args.output, args.resolution, args.observations)
  state = p.run().wait_until_finish()
  if state != PipelineState.DONE:
    # A Flex Template launch (deploy/) or an asynchronous runner: the job
    # writes the table in its last step when it ends.
    return {"state": str(state), "output": args.output}
  _, meta = prior_lib.read_table(args.output)
  return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
  """natvision-prior: 0 written, 2 bad flags or input, 1 storage."""
  console.configure_logging(verbose=console.verbose_requested(argv))
  try:
    meta = run(argv)
  except ConfigError as e:
    print(f"{NAME}: error: {e}", file=sys.stderr)
    return 2
  except storage.StorageError as e:
    print(f"{NAME}: storage error: {e}", file=sys.stderr)
    return 1
  if "state" in meta:
    print(f"{NAME}: the job is {meta['state']}; it writes {meta['output']} "
          f"when it ends", flush=True)
    return 0
  print(f"{NAME}: {meta['observations']} observations of {meta['taxa']} "
        f"taxa in {meta['cells']} H3 cells (resolution "
        f"{meta['resolution']}); skipped {json.dumps(meta['skipped'])}",
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
