"""Former home of shared job pieces; kept only while callers move.

Everything here moved: flags and config to transforms/config.py and the
config dataclasses (transforms/embed.py ``EmbedConfig``), the commit to
transforms/commit.py, the launch steps to pipelines/launch.py.
"""

from pipelines.launch import check_models as _check_models
from pipelines.launch import configure_logging  # noqa: F401
from pipelines.launch import split_beam_args  # noqa: F401
from transforms.config import ConfigError as FlagError  # noqa: F401
from transforms.config import key_values  # noqa: F401
from transforms.embed import EmbedAndWrite  # noqa: F401
from transforms.embed import EmbedConfig as ModelFlags  # noqa: F401
from transforms.models import DEFAULT_MODELS  # noqa: F401


def check_models(flags, choose=None):
  """``launch.check_models`` on an EmbedConfig (the former signature)."""
  return flags.with_models(_check_models(flags.models, choose))
