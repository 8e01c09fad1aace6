"""transforms/embed.py: ``EmbedConfig``, the settings of the embedding steps.

Built from parsed flags without I/O, then checked once: no model, a shard
size under 1, ``--precision int8`` with ``--runtime tf`` and a bad batch
size are refused as ``ConfigError`` naming the flag.  ``EmbedAndWrite``
itself runs in the whole-job tests (tests/test_embed_images.py).
"""

import argparse
import dataclasses

import pytest

from natvision.transforms import config
from natvision.transforms import embed
from natvision.transforms import runtimes


def _config(*flags):
  parser = argparse.ArgumentParser()
  embed.EmbedConfig.add_flags(parser)
  args = parser.parse_args(["--models", "inaturalist_v2,fungi_mobile_v1",
                            *flags])
  return embed.EmbedConfig.from_args(args, "/models")


def test_from_args_reads_each_part_of_the_settings():
  cfg = _config("--batch_size", "8", "--top_k", "3", "--shard_rows", "500")
  assert [m.name for m in cfg.models] == ["inaturalist_v2", "fungi_mobile_v1"]
  assert (cfg.batch_size, cfg.top_k, cfg.shard_rows) == (8, 3, 500)
  assert not cfg.quantization.int8
  assert cfg.photo_config(expected_total=12, run_id="r1").expected_total == 12
  assert cfg.photo_config(run_id="r1").run_id == "r1"
  assert cfg.photos.expected_total is None  # the config itself unchanged
  model = cfg.models[1].with_decision(runtimes.RuntimeDecision("tf", note=""))
  assert cfg.inference_config(model).model is model
  assert cfg.with_models(cfg.models[:1]).models == cfg.models[:1]
  assert cfg.color_profile == cfg.photos.color_profile


@pytest.mark.parametrize("change,flag", [
    ({"models": ()}, "--models names no model"),
    ({"shard_rows": 0}, "--shard_rows must be at least 1"),
    ({"batch_size": 0}, "--batch_size must be at least 1"),
])
def test_values_that_cannot_work_are_refused(change, flag):
  cfg = _config()
  with pytest.raises(config.ConfigError, match=flag):
    dataclasses.replace(cfg, **change)


def test_int8_is_refused_on_tensorflow():
  with pytest.raises(config.ConfigError, match="--precision int8 runs on ONNX"):
    _config("--precision", "int8", "--runtime", "tf")
  assert _config("--precision", "int8").quantization.int8
