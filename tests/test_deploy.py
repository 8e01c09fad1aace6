"""deploy/ agrees with the code: template parameters, versions, files.

* Each Flex Template's metadata.json lists every flag of its pipeline (but
  the local-only ones below), only flags the pipeline's parser accepts with a
  value, exactly the flags it cannot run without as required, with help text
  and regexes that accept valid values and refuse bad ones.
* The Beam SDK image in the Dockerfile is the Beam version setup.py allows,
  deploy/constraints.txt pins and the tests ran with; every pin lies inside
  setup.py's ranges (Beam and TensorFlow equal the installed versions); the
  image's Python is the launcher's and inside setup.py's python_requires.
* The image installs every distribution the run report imports (its
  plots' matplotlib included): the report is written by the job's last
  step, on a worker.
* Every file the Dockerfile copies exists; every Cloud Build target is a
  Dockerfile stage; the scheduled launch body names only template
  parameters, all the required ones, with values that pass the regexes and
  the pipeline's own parser.
"""

import argparse
import ast
import glob
import sys
import importlib.metadata
import importlib.util
import json
import os
import re
import string

import apache_beam
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from natvision.pipelines import build_prior, embed_images, ingest_observations
from natvision.pipelines import launch
from natvision.transforms.config import ConfigError
from natvision.transforms import models as models_lib
from natvision.transforms import snapshots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
CONSTRAINTS = os.path.join(DEPLOY, "constraints.txt")

PIPELINES = {
    "embed_images": embed_images,
    "ingest_observations": ingest_observations,
    "build_prior": build_prior,
}
# The pipelines that run models, and so have a GPU image too.
WITH_GPU = ("embed_images", "ingest_observations")
# Flags deliberately not offered by the templates, with the reason.
NOT_IN_TEMPLATE = {
    "demo": "local only: bundled photos and stand-ins written to local disk",
    "verbose": "console only: Dataflow workers keep full logs",
    "retime_runtimes": "a switch, which template parameters (flags with a "
    "value) cannot be; a template's launch decides from the recorded "
    "timings of its staged ONNX files",
}
# Flags one template does not offer, with the reason.
NOT_IN_TEMPLATE_OF = {
    "ingest_observations": {
        flag: "natvision-ingest refuses --precision int8 at launch: it "
        "cannot read photos of the run to calibrate before the run"
        for flag in ("precision", "min_agreement", "calibration_photos",
                     "agreement_photos")},
}

GCS = "gs://my-bucket/some/path"
EXAMPLES = {
    "input": "gs://my-bucket/photos/**.jpg",
    "output_dir": "gs://my-bucket/tables",
    "models": "inaturalist_v2,fungi_mobile_v1",
    "model_root": "gs://my-bucket/models",
    "model_handle": "inaturalist_v2=gs://my-bucket/copies/inat",
    "labelmap": "fungi_mobile_v1=gs://my-bucket/labels/fungi.csv",
    "batch_size": "32",
    "top_k": "10",
    "taxa": "gs://my-bucket/taxonomy/taxa.csv.gz",
    "rollup_threshold": "0.8",
    "max_unmatched_labels": "0.05",
    "prior": "gs://my-bucket/priors/inat-r4.parquet",
    "prior_smoothing": "1.0",
    "prior_min_observations": "10",
    "resize": "center_crop",
    "runtime": "onnx",
    "max_file_bytes": "1048576",
    "max_pixels": "50000000",
    "read_attempts": "3",
    "decode_threads": "0",
    "prefetch": "8",
    "shard_rows": "20000",
    "color_profile": "srgb",
    "max_error_rate": "0.05",
    "manifest_encoding": "cp1252",
    "archive_encoding": "cp1252",
    "snapshot_dir": "gs://my-bucket/inat/2024-05-27",
    "observations": "gs://my-bucket/gbif/0012345-240101120000000.zip",
    "output": "gs://my-bucket/priors/gbif-r4.parquet",
    "resolution": "4",
    "taxon_column": "speciesKey",
    "photo_uri_template":
        "gs://my-mirror/photos/{photo_id}/medium.{extension}",
    "snapshot_date": "2024-05-27",
    "quality_grade": "research,needs_id",
    "taxon_id": "47170,47169",
    "route": "fungi_mobile_v1=47170",
    "max_attempts": "5",
    "fetch_concurrency": "64",
    "per_host_concurrency": "4",
    "connect_timeout": "5",
    "read_timeout": "30.5",
    "max_redirects": "3",
    "photo_timeout": "60",
    "host_failure_limit": "10",
    "user_agent": "mailto:me@example.org",
    "license": "cc0,cc-by,cc-by-nc",
    "precision": "int8",
    "min_agreement": "top1_agreement=0.99,mean_cosine=0.998",
    "calibration_photos": "64",
    "agreement_photos": "128",
}
BAD = {
    "input": ["/local/photos/*.jpg", "photos/*.jpg", "gs:/b/x", ""],
    "output_dir": ["/tmp/out", "out", "s3://bucket/out"],
    "models": ["bogus", "inaturalist_v2,", "inaturalist_v2 fungi_mobile_v1"],
    "model_root": ["/models", "models"],
    "model_handle": ["bogus=gs://b/m", "inaturalist_v2", "inaturalist_v2=/m"],
    "labelmap": ["inaturalist_v2=gs://b/l.csv", "fungi_mobile_v1=/l.csv"],
    "batch_size": ["0", "-1", "abc", "1.5"],
    "top_k": ["0"],
    "prior": ["/local/prior.parquet", "prior.parquet"],
    "prior_smoothing": ["-1", "alpha", ""],
    "prior_min_observations": ["-1", "1.5", ""],
    "resize": ["crop", "SQUASH"],
    "runtime": ["ort", "TF"],
    "decode_threads": ["-1", "two"],
    "shard_rows": ["0", "-5", "1e4"],
    "color_profile": ["sRGB", "adobe", ""],
    "max_error_rate": ["1.5", "-0.1", "5%"],
    "manifest_encoding": ["", "utf 8", "cp1252;rm"],
    "archive_encoding": ["", "latin 1", "cp1252;rm"],
    "photo_uri_template": ["gs://my-mirror/photos/medium.jpg",
                           "/photos/{photo_id}.jpg"],
    "snapshot_date": ["2024-5-27", "27/05/2024", "latest"],
    "quality_grade": ["research,any", "verified"],
    "taxon_id": ["fungi", "47170,"],
    "route": ["fungi_mobile_v1", "bogus=47170", "fungi_mobile_v1=fungi"],
    "max_attempts": ["0"],
    "fetch_concurrency": ["0", "-1", "many"],
    "per_host_concurrency": ["0", "1.5"],
    "connect_timeout": ["-1", "5s", ""],
    "read_timeout": ["ten"],
    "max_redirects": ["-1", "x"],
    "photo_timeout": ["-1", "2s", ""],
    "host_failure_limit": ["-1", "1.5", "x", ""],
    "user_agent": ["", " leading space", "a\nb"],
    "license": ["cc-by-4.0", "CC-BY", "cc0,", ""],
    "precision": ["INT8", "fp16", ""],
    "min_agreement": ["1.5", "top1=0.9", "top1_agreement=0.9,", "98%"],
    "calibration_photos": ["0", "-1", "many"],
    "agreement_photos": ["1", "0", "2.5"],
}


def _metadata(name):
  with open(os.path.join(DEPLOY, "templates", f"{name}.metadata.json")) as f:
    return json.load(f)


def _params(name):
  return {p["name"]: p for p in _metadata(name)["parameters"]}


def _flags(parser: argparse.ArgumentParser):
  """Long flags of a parser (without dashes) -> their argparse actions."""
  flags = {}
  for action in parser._actions:  # pylint: disable=protected-access
    for option in action.option_strings:
      if option.startswith("--") and option != "--help":
        flags[option[2:]] = action
  return flags


def _matches(param, value):
  return all(re.fullmatch(r, value) for r in param["regexes"])


def _argv(values):
  return [f"--{name}={value}" for name, value in values.items()]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_metadata_lists_every_flag_and_only_flags_that_take_a_value(name):
  flags = _flags(PIPELINES[name]._parser())  # pylint: disable=protected-access
  params = _params(name)
  unknown = sorted(set(params) - set(flags))
  assert not unknown, f"{name} metadata names flags the parser lacks: {unknown}"
  missing = sorted(set(flags) - set(params) - set(NOT_IN_TEMPLATE)
                   - set(NOT_IN_TEMPLATE_OF.get(name, {})))
  assert not missing, (
      f"--{', --'.join(missing)} not in deploy/templates/{name}.metadata.json:"
      f" add it (label, helpText, regexes) or to NOT_IN_TEMPLATE with why")
  for param in params:
    assert flags[param].nargs is None, f"--{param} takes no single value"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_metadata_fields_and_regexes(name):
  doc = _metadata(name)
  assert doc["name"] and doc["description"]
  names = [p["name"] for p in doc["parameters"]]
  assert len(names) == len(set(names))
  for param in doc["parameters"]:
    assert set(param) <= {"name", "label", "helpText", "regexes", "isOptional",
                          "paramType"}, param
    assert param["label"] and len(param["helpText"]) > 20, param["name"]
    assert param["regexes"], param["name"]
    for regex in param["regexes"]:
      assert regex.startswith("^") and regex.endswith("$"), regex
      re.compile(regex)
    value = EXAMPLES[param["name"]]
    assert _matches(param, value), (param["name"], value)
    for bad in BAD.get(param["name"], []):
      assert not _matches(param, bad), (param["name"], bad)
    shown = re.search(r"Example: (\S+)$", param["helpText"])
    if shown:
      assert _matches(param, shown.group(1)), (param["name"], shown.group(1))


def test_regexes_follow_the_registry():
  params = {**_params("embed_images"), **_params("ingest_observations")}
  names = list(models_lib.REGISTRY)
  assert _matches(params["models"], ",".join(names))
  for model in names:
    assert _matches(params["models"], model)
    assert _matches(params["model_handle"], f"{model}={GCS}")
    assert _matches(params["route"], f"{model}=47170")
    classifier = models_lib.REGISTRY[model].kind == models_lib.CLASSIFIER
    assert _matches(params["labelmap"], f"{model}={GCS}") == classifier
  for policy in models_lib.RESIZE_POLICIES:
    assert _matches(params["resize"], policy)
  for grade in snapshots.QUALITY_GRADES + ("any",):
    assert _matches(params["quality_grade"], grade)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_required_params_are_exactly_what_the_pipeline_needs(name):
  module = PIPELINES[name]
  params = _params(name)
  required = {p: EXAMPLES[p] for p, v in params.items()
              if not v.get("isOptional")}
  try:
    module.parse_args(_argv(required))
  except ConfigError as e:
    pytest.fail(f"the required parameters of {name} are not enough: {e}")
  for dropped in required:
    rest = {p: v for p, v in required.items() if p != dropped}
    with pytest.raises(ConfigError):  # each one needed, else optional
      module.parse_args(_argv(rest))
  for param in params:  # and every optional one accepted with its example
    module.parse_args(_argv({**required, param: EXAMPLES[param]}))


def _dockerfile_lines():
  """Dockerfile instructions, continuation lines joined, comments dropped."""
  with open(DOCKERFILE) as f:
    text = f.read()
  text = re.sub(r"\\\n", " ", text)
  return [l.strip() for l in text.splitlines()
          if l.strip() and not l.strip().startswith("#")]


def _setup_requirements():
  import distutils.core  # pylint: disable=import-outside-toplevel,deprecated-module
  dist = distutils.core.run_setup(os.path.join(REPO, "setup.py"),
                                  stop_after="init")
  reqs = [Requirement(r) for r in dist.install_requires]
  for extra in dist.extras_require.values():
    reqs.extend(Requirement(r) for r in extra)
  return reqs, SpecifierSet(dist.python_requires)


def _constraints():
  pins = {}
  with open(CONSTRAINTS) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, _, version = line.partition("==")
        assert version, f"constraints.txt pins exact versions: {line}"
        pins[name.strip().lower()] = version.strip()
  return pins


def test_beam_version_of_the_image_is_the_pinned_and_tested_one():
  froms = [l for l in _dockerfile_lines() if l.upper().startswith("FROM ")]
  sdk = [re.search(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", l) for l in froms]
  sdk = [m for m in sdk if m]
  assert len(sdk) == 1, froms
  python, beam = sdk[0].group(1), sdk[0].group(2)
  reqs, python_requires = _setup_requirements()
  beam_reqs = [r for r in reqs if r.name == "apache-beam"]
  assert beam_reqs
  for req in beam_reqs:
    assert Version(beam) in req.specifier, f"{beam} outside setup.py {req}"
  assert beam == apache_beam.__version__
  assert _constraints()["apache-beam"] == beam
  launcher = [re.search(r"python(\d)(\d+)-template-launcher-base", l)
              for l in froms]
  launcher = [m for m in launcher if m]
  assert len(launcher) == 1, froms
  assert f"{launcher[0].group(1)}.{launcher[0].group(2)}" == python
  assert Version(python + ".0") in python_requires


# Pins that must be the versions the tests ran with: Beam (launcher, workers
# and the SDK image must agree) and TensorFlow (the GPU image's CUDA wheels
# match it). The others must lie inside setup.py's ranges; a fresh
# environment may resolve newer patch releases of them.
MUST_EQUAL_TESTED = {"apache-beam", "tensorflow"}


def test_constraints_pin_the_tested_versions_inside_setup_ranges():
  reqs, _ = _setup_requirements()
  ranges = {}
  for req in reqs:
    ranges.setdefault(req.name.lower(), []).append(req.specifier)
  pins = _constraints()
  assert {"apache-beam", "tensorflow", "tf-keras", "tensorflow-hub"} <= set(
      pins)
  for name, version in pins.items():
    installed = importlib.metadata.version(name)
    if name in MUST_EQUAL_TESTED:
      assert installed == version, (
          f"{name}: constraints.txt pins {version}, tests ran with "
          f"{installed}; update the pin (and the Dockerfile) and rebuild")
    for spec in ranges.get(name, []):
      assert Version(version) in spec, f"{name}=={version} outside {spec}"


def _image_extras():
  """The extras of the package that the Dockerfile's pip install names."""
  extras = set()
  for line in _dockerfile_lines():
    for match in re.finditer(r'"/build\[([^\]]*)\]"', line):
      extras |= {e.strip() for e in match.group(1).split(",")}
  assert extras, "the Dockerfile installs /build[...]"
  return extras


def _imported_distributions(paths):
  """Distributions (lower case) of the third-party modules ``paths`` import,
  lazy imports included."""
  owners = importlib.metadata.packages_distributions()
  found = set()
  for path in paths:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("natvision", "__future__"):
          continue
        assert top in owners, f"{path}: no distribution provides {top}"
        found |= {d.lower() for d in owners[top]}
  return found


def test_the_image_installs_what_the_run_report_imports():
  import distutils.core  # pylint: disable=import-outside-toplevel,deprecated-module
  dist = distutils.core.run_setup(os.path.join(REPO, "setup.py"),
                                  stop_after="init")
  installed = {Requirement(r).name.lower() for r in dist.install_requires}
  for extra in _image_extras():
    installed |= {Requirement(r).name.lower()
                  for r in dist.extras_require[extra]}
  report = sorted(glob.glob(os.path.join(REPO, "tools", "report*.py")))
  needed = _imported_distributions(report)
  assert "matplotlib" in needed
  assert needed <= installed, (
      f"the image lacks {sorted(needed - installed)}: add the extra that "
      f"holds them to deploy/Dockerfile's pip install")


def _copies():
  """(sources, destination) of each COPY without --from."""
  copies = []
  for line in _dockerfile_lines():
    words = line.split()
    if words[0].upper() != "COPY":
      continue
    args = [w for w in words[1:] if not w.startswith("--")]
    if any(w.startswith("--from") for w in words[1:]):
      continue
    copies.append((args[:-1], args[-1]))
  return copies


def test_dockerfile_copy_sources_exist():
  copies = _copies()
  assert copies
  for sources, _ in copies:
    for source in sources:
      assert os.path.exists(os.path.join(REPO, source)), source
  copied = {s for sources, _ in copies for s in sources}
  assert {"setup.py", "pipelines", "transforms", "deploy/launch.py",
          "deploy/constraints.txt"} <= copied


def _stages():
  """Stage name -> its instructions."""
  stages, current = {}, None
  for line in _dockerfile_lines():
    match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", line, re.IGNORECASE)
    if match:
      current = match.group(1)
      stages[current] = []
    elif current:
      stages[current].append(line)
  return stages


def _launch_module():
  spec = importlib.util.spec_from_file_location(
      "natvision_deploy_launch", os.path.join(DEPLOY, "launch.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_dockerfile_stages_entry_point_and_cloud_build_targets():
  stages = _stages()
  base = " ".join(stages["base"])
  (launch_dest,) = [d for s, d in _copies() if s == ["deploy/launch.py"]]
  assert f"FLEX_TEMPLATE_PYTHON_PY_FILE={launch_dest}" in base
  assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in base
  assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in base
  assert "--constraint" in base
  gpu = " ".join(stages["gpu_base"])
  assert '"tensorflow[and-cuda]"' in gpu and "--constraint" in gpu
  launch = _launch_module()
  assert set(launch.PIPELINES) == set(PIPELINES)
  for name in PIPELINES:
    for stage in (name,) + ((f"{name}_gpu",) if name in WITH_GPU else ()):
      assert f"ENV NATVISION_PIPELINE={name}" in stages[stage], stage
  assert "build_prior_gpu" not in stages
  with open(os.path.join(DEPLOY, "cloudbuild.yaml")) as f:
    build = yaml.safe_load(f)
  targets = [s["args"][s["args"].index("--target") + 1] for s in build["steps"]]
  assert sorted(targets) == sorted(
      [n for n in PIPELINES] + [f"{n}_gpu" for n in WITH_GPU])
  for step in build["steps"]:
    assert step["args"][step["args"].index("-f") + 1] == "deploy/Dockerfile"
    assert step["args"][-1] == "."


def _schedule_body():
  with open(os.path.join(DEPLOY, "schedule",
                         "ingest_observations.launch.json")) as f:
    text = f.read()
  names = {m.group(1) for m in re.finditer(r"\$\{(\w+)\}", text)}
  assert names == {"BUCKET", "IMAGE_PREFIX", "TAG", "WORKER_SA"}, names
  return json.loads(string.Template(text).substitute(
      BUCKET="my-bucket", TAG="t1", WORKER_SA="sa@p.iam.gserviceaccount.com",
      IMAGE_PREFIX="europe-west1-docker.pkg.dev/p/r/natvision"))


FLEX_ENVIRONMENT_FIELDS = {
    "numWorkers", "maxWorkers", "zone", "serviceAccountEmail", "tempLocation",
    "machineType", "additionalExperiments", "network", "subnetwork",
    "additionalUserLabels", "kmsKeyName", "ipConfiguration", "workerRegion",
    "workerZone", "enableStreamingEngine", "flexrsGoal", "stagingLocation",
    "sdkContainerImage", "diskSizeGb", "autoscalingAlgorithm",
    "dumpHeapOnOom", "saveHeapDumpsToGcsPath", "launcherMachineType",
    "enableLauncherVmSerialPortLogging", "streamingMode",
    "additionalPipelineOptions"}


def test_scheduled_launch_body_matches_the_ingest_template():
  launch = _schedule_body()["launchParameter"]
  assert launch["containerSpecGcsPath"].endswith("/ingest_observations.json")
  assert launch["environment"]["sdkContainerImage"].endswith("-ingest:t1")
  assert set(launch["environment"]) <= FLEX_ENVIRONMENT_FIELDS
  values = launch["parameters"]
  params = _params("ingest_observations")
  assert set(values) <= set(params)
  assert {p for p, v in params.items() if not v.get("isOptional")} <= set(
      values)
  for name, value in values.items():
    assert _matches(params[name], value), (name, value)
  # No date: each run writes the partition of its launch date (UTC).
  assert "snapshot_date" not in values
  config, _ = ingest_observations.parse_args(_argv(values))
  assert config.model_names == ("inaturalist_v2", "fungi_mobile_v1")


# What each pipeline's own flag check says when given only its output.
ONLY_OUTPUT = {
    "embed_images": "--output_dir=gs://b/o",
    "ingest_observations": "--output_dir=gs://b/o",
    "build_prior": "--output=gs://b/p.parquet",
}
MISSING_FLAG = {
    "embed_images": "--input is required",
    "ingest_observations": "--snapshot_dir is required",
    "build_prior": "--observations is required",
}


def test_launch_entry_point_dispatches_and_lets_template_launches_through(
    monkeypatch, capsys):
  launch = _launch_module()
  monkeypatch.delenv(launch.PIPELINE_ENV, raising=False)
  assert launch.main(["--output_dir=gs://b/o"]) == 2
  assert "--target" in capsys.readouterr().err
  assert set(MISSING_FLAG) == set(PIPELINES)
  for name, module in sorted(PIPELINES.items()):
    # Each writes its output inside the graph, so a template launch goes
    # through.
    monkeypatch.setenv(launch.PIPELINE_ENV, name)
    for template in ([], ["--template_location=gs://b/t/job"]):
      # Delegated: the pipeline's own flag check answers, not the guard.
      assert launch.main(template + [ONLY_OUTPUT[name]]) == 2
      err = capsys.readouterr().err
      assert MISSING_FLAG[name] in err, (name, template, err)
      assert "Flex Template" not in err, (name, template)


def test_readme_names_only_files_that_exist_and_flags_that_are_known():
  with open(os.path.join(DEPLOY, "README.md")) as f:
    text = f.read()
  paths = set(re.findall(r"\b(deploy/[\w./-]+\w)", text))
  assert "deploy/Dockerfile" in paths
  for path in paths:
    assert os.path.exists(os.path.join(REPO, path)), path
  # Pipeline options, as --snake_case flags or as template parameters in
  # gcloud's ^~^a=1~b=2 syntax: each a natvision flag or a Beam option.
  ours = set()
  for module in PIPELINES.values():
    ours |= set(_flags(module._parser()))  # pylint: disable=protected-access
  named = set(re.findall(r"--([a-z0-9]+(?:_[a-z0-9]+)+)", text))
  named |= set(re.findall(r"(?:\^~\^|~)([a-z0-9_]+)=", text))
  assert {"sdk_container_image", "dataflow_service_options",
          "number_of_worker_harness_threads"} <= named
  assert "--experiments=no_use_multiple_sdk_containers" in text
  not_pipeline = {"service_port"}  # worker_pool_main's own flag
  beam = sorted(n for n in named - ours - not_pipeline
                if launch.unknown_beam_flags([f"--{n}=1"]))
  assert not beam, f"deploy/README.md names unknown flags {beam}"
