"""Flex Template entry point: runs the natvision pipeline the image is built for.

The template launcher runs ``python /template/launch.py --runner=DataflowRunner
--template_location=gs://... <template parameters as --name=value>``
(``FLEX_TEMPLATE_PYTHON_PY_FILE``).  The pipeline comes from the image's
``NATVISION_PIPELINE`` variable (``embed_images``, ``ingest_observations``
or ``build_prior``, set per Dockerfile target), so one file serves every image, and the pipeline
modules are imported from the installed package, never from this folder.

Under a Flex Template, Beam writes the job description to
``--template_location`` instead of submitting it, and ``p.run()`` returns
before the job has even started.  A pipeline that commits its tables after
``wait_until_finish()`` would then commit nothing and replace the previous
tables with empty ones, and the job's own output would stay in ``_staging``.
The jobs therefore commit in the graph's last step
(``transforms.commit.CommitRun``; build_prior writes its one table there),
which a template launch that does not wait runs all the same.  See deploy/README.md, "Before the first launch".
"""

import importlib
import os
import sys
from typing import Optional, Sequence

PIPELINES = ("embed_images", "ingest_observations", "build_prior")
# The jobs that end with a run report (the prior's job writes one table).
WITH_REPORT = ("embed_images", "ingest_observations")
PIPELINE_ENV = "NATVISION_PIPELINE"


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the pipeline named by ``$NATVISION_PIPELINE`` with ``argv``.

  Returns:
    The pipeline's exit status; 2 when the image names no known pipeline.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  name = os.environ.get(PIPELINE_ENV, "")
  if name not in PIPELINES:
    print(f"natvision launch: ${PIPELINE_ENV} is {name!r}; build the image "
          f"with --target set to one of {', '.join(PIPELINES)}",
          file=sys.stderr)
    return 2
  module = importlib.import_module(f"natvision.pipelines.{name}")
  if name not in WITH_REPORT:
    return module.main(argv)
  # The run report is tools/report.py's, handed to the job as its last step
  # (the pipelines never import tools/).
  html_report = importlib.import_module("natvision.tools.report")
  return module.main(argv, report_writer=html_report.write_after_run)


if __name__ == "__main__":
  sys.exit(main())
