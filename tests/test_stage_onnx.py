"""tools/stage_onnx.py: the CLI that stages natvision.onnx next to a model.

A staged file is what a worker uses without converting (counted by wrapping
the converter, tests/runtime_helpers.py), and a second staging refuses to
replace it unless asked to.
"""

import os
import shutil

from tests.runtime_helpers import (  # noqa: F401  (fixtures)
    conversions, model_root, nothing_remembered, onnx_cache, resolve)
from natvision.tools import stage_onnx
from natvision.transforms.runtimes import chooser
from natvision.transforms.runtimes import onnx_store


def test_staging_cli_writes_a_file_that_workers_use(model_root, tmp_path,
                                                    capsys, conversions):
  root = str(tmp_path / "models")
  for name in ("inaturalist_v2", "inception_resnet_v2"):
    shutil.copytree(os.path.join(model_root, name), os.path.join(root, name))
  args = ["--model_root", root,
          "--models", "inaturalist_v2,inception_resnet_v2"]
  assert stage_onnx.main(args) == 0
  assert "staged inaturalist_v2" in capsys.readouterr().out
  assert conversions == {"inaturalist_v2": 1, "inception_resnet_v2": 1}
  for name in ("inaturalist_v2", "inception_resnet_v2"):
    staged = os.path.join(root, name, onnx_store.STAGED_ONNX)
    assert os.path.exists(staged)
    decision = chooser.choose(resolve(root, name, "onnx"))
    assert decision.runtime == "onnx" and decision.onnx_source == "staged"
    assert decision.onnx_path == staged
  assert conversions == {"inaturalist_v2": 1, "inception_resnet_v2": 1}
  # A second staging does not replace the files unless asked to.
  assert stage_onnx.main(args) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert stage_onnx.main(args[:-1] + ["inaturalist_v2", "--overwrite"]) == 0
  assert conversions["inaturalist_v2"] == 2
