"""transforms/spec.py: what a run is, as a value.

The spec is written beside the rows (table metadata, run.json) and read
back by resume and search, so it must survive the round trip exactly, give
the same JSON for equal specs whatever the order things were made in, say
what differs between two specs, and refuse what is not a spec.  How resume
uses it is tests/test_resume.py's; the table metadata, tests/test_sinks.py
and test_resume's round trip through a Parquet footer.
"""

import dataclasses
import json

import pytest

from natvision.transforms import spec as spec_lib


def _model(name="inaturalist_v2", **changes):
  fields = dict(name=name, kind="embedder", location="/models/" + name,
                fingerprint="0" * 32, runtime="onnx", precision="fp32",
                int8_file=None, resize="center_crop", input_size=299,
                output_width=64, labelmap=None, top_k=None, tolerance=1e-4)
  fields.update(changes)
  return spec_lib.DecidedModel(**fields)


def _run(*models, **changes):
  fields = dict(models=models or (_model(),), color_profile="ignore",
                max_file_bytes=100_000_000, max_pixels=50_000_000,
                version="0.1.0")
  fields.update(changes)
  return spec_lib.RunSpec(**fields)


def test_json_round_trip_is_exact_and_deterministic():
  fungi = _model("fungi_mobile_v1", kind="classifier", output_width=4128,
                 labelmap="/models/fungi_mobile_v1/labels.csv", top_k=5,
                 precision="int8", int8_file="/cache/f.int8.onnx",
                 tolerance=5e-5, resize="squash")
  run = _run(_model(), fungi, color_profile="srgb")
  text = run.to_json()
  assert spec_lib.RunSpec.from_json(text) == run
  # Sorted keys, no spaces: the same spec always gives the same string.
  assert text == json.dumps(json.loads(text), sort_keys=True,
                            separators=(",", ":"))
  shuffled = json.dumps(dict(reversed(list(json.loads(text).items()))))
  assert spec_lib.RunSpec.from_json(shuffled).to_json() == text
  assert run.model("fungi_mobile_v1") == fungi
  with pytest.raises(KeyError, match="no model 'nope'.*inaturalist_v2"):
    run.model("nope")


def test_differences_name_each_field_that_changes_rows():
  run = _run(_model(), _model("fungi_mobile_v1", kind="classifier",
                              top_k=5, output_width=4128))
  assert run.differences(run) == []
  other = dataclasses.replace(run, color_profile="srgb", models=(
      _model(precision="int8", int8_file="/c/x.int8.onnx"), run.models[1]))
  assert other.differences(run) == [
      "color_profile: 'srgb' != 'ignore'",
      "models[inaturalist_v2].int8_file: '/c/x.int8.onnx' != None",
      "models[inaturalist_v2].precision: 'int8' != 'fp32'"]
  assert other != run


@pytest.mark.parametrize("changes,match", [
    (dict(runtime="auto"), "runtime is tf or onnx"),
    (dict(precision="fp16"), "precision is fp32 or int8"),
    (dict(precision="int8"), "int8 file goes with int8"),
    (dict(int8_file="/c/x.int8.onnx"), "int8 file goes with int8"),
])
def test_a_model_that_no_launcher_decides_is_refused(changes, match):
  with pytest.raises(spec_lib.SpecError, match=match):
    _model(**changes)


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"models": []}',
    json.dumps(dict(_run().to_dict(), extra=1)),
])
def test_what_is_not_a_spec_is_refused(text):
  with pytest.raises(spec_lib.SpecError, match="not a run spec"):
    spec_lib.RunSpec.from_json(text)


def test_a_classifier_with_taxa_records_their_fingerprint_and_threshold():
  from natvision.transforms import models as models_lib  # pylint: disable=import-outside-toplevel
  from natvision.transforms import runtimes  # pylint: disable=import-outside-toplevel
  from natvision.transforms import taxonomy  # pylint: disable=import-outside-toplevel
  taxa = taxonomy.Taxa(kind=taxonomy.INATURALIST, rank={7: "species"},
                       name={7: "Amanita muscaria"}, ancestry={7: ()})
  label_taxa = taxonomy.match_labels(["Amanita muscaria"], taxa, 0.7)
  decided = []
  for name in ("fungi_mobile_v1", "inaturalist_v2"):
    (model,) = models_lib.resolve_models([name], "/m")
    model = model.with_decision(runtimes.RuntimeDecision("tf", note="test"))
    decided.append(spec_lib.decided_model(
        dataclasses.replace(model, label_taxa=label_taxa), 5, "0" * 32))
  classifier, embedder = decided
  assert classifier.taxa_fingerprint == label_taxa.fingerprint
  assert len(classifier.taxa_fingerprint) == 32
  assert classifier.rollup_threshold == 0.7
  assert embedder.taxa_fingerprint is None and embedder.rollup_threshold is None
  run = _run(*decided)
  assert spec_lib.RunSpec.from_json(run.to_json()) == run
  # A spec written before --taxa existed reads as one without a taxonomy.
  old = json.loads(_run().to_json())
  for model in old["models"]:
    del model["taxa_fingerprint"], model["rollup_threshold"]
  assert spec_lib.RunSpec.from_dict(old) == _run()
