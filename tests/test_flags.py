"""Flag parsing: a pure function; bad values fail naming the flag."""

import os

import pytest

from natvision.pipelines import embed_images
from natvision.transforms import demo
from natvision.transforms import models as models_lib
from natvision.transforms.config import ConfigError


def _parse(*args):
  return embed_images.parse_args(list(args))


BASE = ("--input", "photos/*.jpg", "--output_dir", "out", "--model_root", "/m")


def test_defaults_and_beam_flags_pass_through():
  config, options = _parse(*BASE, "--runner", "DirectRunner",
                           "--direct_num_workers", "2")
  assert [m.name for m in config.models] == list(models_lib.DEFAULT_MODELS)
  assert config.embed.batch_size == 16 and config.embed.top_k == 5
  assert config.models[0].path == "/m/inaturalist_v2"
  assert config.models[0].resize == "center_crop"
  assert config.models[1].labelmap_path == "/m/fungi_mobile_v1/labelmap.csv"
  assert options.get_all_options()["runner"] == "DirectRunner"


def test_resize_override_handles_and_labelmap():
  config, _ = _parse("--input", "x.csv", "--output_dir", "o",
                     "--models", "fungi_mobile_v1,inception_resnet_v2",
                     "--model_handle", "fungi_mobile_v1=gs://b/fungi",
                     "--model_handle", "inception_resnet_v2=/irv2",
                     "--labelmap", "fungi_mobile_v1=/l.csv",
                     "--resize", "center_crop")
  assert [m.path for m in config.models] == ["gs://b/fungi", "/irv2"]
  assert config.models[0].labelmap_path == "/l.csv"
  assert {m.resize for m in config.models} == {"center_crop"}
  assert config.manifest_path == "x.csv"


@pytest.mark.parametrize("args,flag", [
    (("--output_dir", "o", "--model_root", "/m"), "--input"),
    (("--input", "a", "--model_root", "/m"), "--output_dir"),
    (BASE + ("--batch_size", "0"), "--batch_size"),
    (BASE + ("--top_k", "0"), "--top_k"),
    (BASE + ("--models", "fungi_mobile_v1", "--top_k", "9999"), "--top_k"),
    (BASE + ("--models", "resnet50"), "--models"),
    (BASE + ("--models", ""), "--models"),
    (BASE + ("--models", "fungi_mobile_v1,fungi_mobile_v1"), "--models"),
    (("--input", "a", "--output_dir", "o"), "--model_root"),
    (BASE + ("--model_handle", "fungi_mobile_v1"), "--model_handle"),
    (BASE + ("--model_handle", "nope=/x"), "--model_handle"),
    (BASE + ("--labelmap", "inaturalist_v2=/l.csv"), "--labelmap"),
    (BASE + ("--max_error_rate", "2"), "--max_error_rate"),
    (BASE + ("--max_pixels", "-1"), "--max_pixels"),
    (BASE + ("--output-dir", "x"), "--output-dir"),
    (("--input", "m.csv", "--input", "b/*.jpg", "--output_dir", "o",
      "--model_root", "/m"), "--input"),
])
def test_bad_flags_name_the_flag(args, flag):
  with pytest.raises(ConfigError) as e:
    _parse(*args)
  assert flag in str(e.value)


def test_unknown_flag_suggests_the_one_meant():
  with pytest.raises(ConfigError, match="did you mean --output_dir"):
    _parse(*BASE, "--output-dir", "x")
  with pytest.raises(ConfigError, match="see --help"):
    _parse(*BASE, "--frobnicate", "x")


def test_bad_choice_exits_with_usage():
  with pytest.raises(SystemExit):
    _parse(*BASE, "--resize", "stretch")


def test_main_reports_flag_errors_without_traceback(capsys):
  assert embed_images.main(["--output_dir", "o"]) == 2
  assert "--input is required" in capsys.readouterr().err


def test_demo_defaults():
  config, _ = _parse("--demo")
  assert config.output_dir == embed_images.DEFAULT_DEMO_OUTPUT
  assert all(i.startswith(embed_images.SAMPLE_PHOTOS_DIR) for i in config.inputs)
  # The machine's stand-ins (transforms/demo.py), whatever the output.
  assert config.models[0].path == os.path.join(demo.standins_root(),
                                               "inaturalist_v2")


def test_color_profile_flag_reaches_the_photo_config():
  config, _ = _parse(*BASE)
  assert config.embed.color_profile == "ignore"
  assert config.embed.photo_config().color_profile == "ignore"
  config, _ = _parse(*BASE, "--color_profile", "srgb")
  assert config.embed.color_profile == "srgb"
  assert config.embed.photo_config().color_profile == "srgb"
  with pytest.raises(SystemExit):
    _parse(*BASE, "--color_profile", "p3")


def test_demo_ids_are_relative_to_the_sample_folder_only_for_its_photos():
  config, _ = _parse("--demo")
  assert config.ids_relative_to == embed_images.SAMPLE_PHOTOS_DIR
  assert os.path.isabs(embed_images.SAMPLE_PHOTOS_DIR)
  config, _ = _parse("--demo", "--input", "photos/*.jpg")
  assert config.ids_relative_to is None
  config, _ = _parse(*BASE)
  assert config.ids_relative_to is None


def test_model_locations_are_absolute_and_resolved(tmp_path, monkeypatch):
  real = tmp_path / "real_models"
  real.mkdir()
  (tmp_path / "link").symlink_to(real)
  monkeypatch.chdir(tmp_path)
  config, _ = _parse("--input", "a/*.jpg", "--output_dir", "o",
                     "--model_root", "link",
                     "--model_handle", "inception_resnet_v2=irv2",
                     "--labelmap", "fungi_mobile_v1=maps/l.csv")
  root = os.path.realpath(real)
  assert [m.path for m in config.models] == [
      f"{root}/inaturalist_v2", f"{root}/fungi_mobile_v1",
      os.path.join(os.path.realpath(tmp_path), "irv2")]
  assert config.models[1].labelmap_path == os.path.join(
      os.path.realpath(tmp_path), "maps", "l.csv")
  # What the tables' metadata and run.json record.
  assert config.models[0].describe()["path"] == f"{root}/inaturalist_v2"
  config, _ = _parse("--input", "a/*.jpg", "--output_dir", "o",
                     "--model_root", "gs://bucket/models")
  assert config.models[0].path == "gs://bucket/models/inaturalist_v2"
