"""Commands that use the tables the jobs wrote: evaluate, search, report.

They read ``OUT/embeddings/<model>/``, ``OUT/predictions/<model>/`` and
``OUT/errors/`` as ``natvision-embed`` (plain files) or ``natvision-ingest``
(``snapshot_date=...`` partitions) left them, on any Beam filesystem.
"""

from natvision.transforms import console as _console

# Before any module here imports Beam (transforms/console.py).
_console.drop_import_notices()
