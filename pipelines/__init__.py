"""natvision pipelines: thin wiring from command-line flags to Beam graphs."""

from natvision.transforms import console as _console

# Before any module here imports Beam (transforms/console.py).
_console.drop_import_notices()
