"""The launch sequence: the checks it makes before anything heavy is
imported (its console is tests/test_console.py's)."""

import os
import subprocess
import sys
import textwrap

import pytest

from natvision.transforms import models as models_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------
# Models that are not there fail before TensorFlow is imported.

_MAIN_THEN_TF = textwrap.dedent("""
    import sys
    from natvision.pipelines import embed_images
    status = embed_images.main(sys.argv[1:])
    print("tensorflow imported:", "tensorflow" in sys.modules)
    sys.exit(status)
""")
SAMPLE_JPGS = os.path.join(REPO, "pipelines", "sample_photos", "*.jpg")


def _launch(argv):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-c", _MAIN_THEN_TF, *argv],
                        capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=120)


@pytest.mark.parametrize("case", ["model_root", "model_handle"])
def test_missing_models_exit_2_naming_the_folder_before_tensorflow(
    tmp_path, case):
  missing = str(tmp_path / "no_such_folder")
  if case == "model_root":
    flags = ["--model_root", missing]
    expected = (f"natvision-embed: error: --model_root {missing} does not "
                f"exist; pass the folder that holds one folder per model "
                f"(inaturalist_v2/, fungi_mobile_v1/, inception_resnet_v2/)")
  else:
    flags = ["--models", "inaturalist_v2", "--model_handle",
             f"inaturalist_v2={missing}"]
    expected = (f"natvision-embed: error: --model_handle "
                f"inaturalist_v2={missing}: no SavedModel there")
  out = tmp_path / "out"
  done = _launch(["--input", SAMPLE_JPGS, "--output_dir", str(out), *flags])
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stdout.splitlines()[-1] == "tensorflow imported: False"
  errors = [l for l in done.stderr.splitlines() if l]
  assert len(errors) == 1 and errors[0].startswith(expected), errors
  assert os.path.join(missing, "inaturalist_v2") not in errors[0]
  assert errors[0].count("pass ") == 1  # the fix, given once
  assert not out.exists()


def _fake_model(root, name):
  os.makedirs(os.path.join(root, name))
  open(os.path.join(root, name, "saved_model.pb"), "wb").close()


def test_check_locations_names_the_model_missing_under_the_root(tmp_path):
  root = str(tmp_path / "models")
  _fake_model(root, "inaturalist_v2")
  found = models_lib.resolve_models(["inaturalist_v2"], root)
  models_lib.check_locations(found)  # there: nothing raised
  both = models_lib.resolve_models(["inaturalist_v2", "fungi_mobile_v1"],
                                   root)
  with pytest.raises(models_lib.ModelError) as raised:
    models_lib.check_locations(both)
  message = str(raised.value)
  assert message.startswith(
      f"model fungi_mobile_v1: no SavedModel at {root}/fungi_mobile_v1 (no "
      f"saved_model.pb); put a copy of the model")
  assert message.endswith(
      f"in fungi_mobile_v1/ under --model_root {root}, or pass "
      f"--model_handle fungi_mobile_v1=PATH")


def test_check_locations_names_a_root_that_holds_none_of_the_models(
    tmp_path):
  root = str(tmp_path / "models")
  _fake_model(root, "something_else")
  with pytest.raises(models_lib.ModelError) as raised:
    models_lib.check_locations(models_lib.resolve_models(
        ["inaturalist_v2", "fungi_mobile_v1"], root))
  assert str(raised.value).startswith(
      f"--model_root {root} holds none of the models (no SavedModel in "
      f"inaturalist_v2/, fungi_mobile_v1/ under it)")
