"""Both jobs' summaries are one type (transforms/run_summary.py): the same
keys in the JSON for both jobs, what only one job counts is None for the
other, and summaries written before ``version`` (both old shapes) read
into the same type."""

import dataclasses
import json

import pytest

from natvision.transforms import commit
from natvision.transforms import models as models_lib
from natvision.transforms import run_summary
from tests import report_helpers
from tests.report_helpers import embed_summary as _embed
from tests.report_helpers import embed_summary_v1 as _embed_v1
from tests.report_helpers import ingest_summary as _ingest
from tests.report_helpers import ingest_summary_v1 as _ingest_v1


def test_both_jobs_write_the_same_keys_with_a_version():
  embed, ingest = _embed(), _ingest()
  assert list(embed) == list(ingest)
  assert embed["version"] == ingest["version"] == run_summary.SUMMARY_VERSION
  assert (embed["job"], ingest["job"]) == (run_summary.EMBED,
                                           run_summary.INGEST)
  assert list(embed["models"]) == list(ingest["models"]) == ["inaturalist_v2"]
  assert list(embed["models"]["inaturalist_v2"]) == list(
      ingest["models"]["inaturalist_v2"])
  assert "rows" not in embed and "model_details" not in ingest
  # Each key is a field of the type, and the JSON reads back equal.
  for raw in (embed, ingest):
    again = run_summary.RunSummary.from_dict(json.loads(json.dumps(raw)))
    assert again.to_dict() == raw


@pytest.mark.parametrize("version", [1, 2])
def test_both_jobs_read_the_same_where_the_fields_mean_the_same(version):
  raw_embed, raw_ingest = ((_embed_v1(), _ingest_v1()) if version == 1
                           else (_embed(), _ingest()))
  embed = run_summary.RunSummary.from_dict(raw_embed)
  ingest = run_summary.RunSummary.from_dict(raw_ingest)
  assert (embed.version, ingest.version) == (version, version)
  assert (embed.job, ingest.job) == (run_summary.EMBED, run_summary.INGEST)
  assert embed.errors == ingest.errors and embed.errors.total == 2
  assert embed.timings == ingest.timings
  assert list(embed.timings) == list(commit.TIMING_PHASES)  # phase order
  assert embed.elapsed_s == ingest.elapsed_s
  assert embed.model_loads == ingest.model_loads
  e, i = embed.model("inaturalist_v2"), ingest.model("inaturalist_v2")
  for field in ("name", "kind", "runtime", "resize", "output_width",
                "precision", "rows", "table"):
    assert getattr(e, field) == getattr(i, field), field
  assert e.rows == 8 and e.resize == "center_crop"
  assert e.table == "embeddings/inaturalist_v2"
  # What one job counts is None for the other.
  assert (embed.inputs, embed.images_per_second) == (10, 2.5)
  assert (ingest.inputs, ingest.images_per_second) == (None, None)
  assert embed.partition is None
  assert ingest.partition == "snapshot_date=2024-03-03"
  assert (e.new, e.failed) == (None, None)
  assert (i.new, i.done_before, i.failed) == (9, 3, 1)
  assert embed.standin and not ingest.standin


def test_an_old_summary_reads_as_the_new_one():
  for old, new in ((_embed_v1(), _embed()), (_ingest_v1(), _ingest())):
    got = run_summary.RunSummary.from_dict(old)
    want = run_summary.RunSummary.from_dict(new)
    # The old files carried the same figures (the ingest one named the
    # table and route; held_back 0) but no version.
    assert dataclasses.replace(got, version=2) == want


def test_a_model_described_is_a_model_summary():
  described = dict(report_helpers.DESCRIBED, format="tf_saved_model",
                   path="/m", input_size=224, labelmap=None,
                   taxa_fingerprint=None, prior_fingerprint=None,
                   licence="x", source="y", runtime_note="n",
                   agreement=None)
  m = run_summary.ModelSummary.from_described(described, "embeddings/x")
  assert m.table == "embeddings/x" and m.path == "/m"
  with pytest.raises(TypeError):
    run_summary.ModelSummary.from_described(dict(described, new_field=1),
                                            "embeddings/x")
  # ResolvedModel.describe() names no field the type lacks.
  fields = {f.name for f in dataclasses.fields(run_summary.ModelSummary)}
  source = open(models_lib.__file__, encoding="utf-8").read()
  body = source[source.index("def describe(self)"):]
  body = body[:body.index("\n  def ") if "\n  def " in body else None]
  import re  # pylint: disable=import-outside-toplevel
  keys = set(re.findall(r'^\s+"(\w+)":', body, re.M))
  assert keys and keys <= fields, keys - fields


def test_read_reads_a_file_and_none_when_absent(tmp_path):
  path = tmp_path / "run.json"
  assert run_summary.read(str(path)) is None
  run_summary.write(str(path), run_summary.RunSummary.from_dict(_embed()))
  assert run_summary.read(str(path)).run_id == "r1"
  path.write_text(json.dumps(_ingest_v1()))  # a file an older run wrote
  assert run_summary.read(str(path)).model("inaturalist_v2").new == 9
  path.write_text(json.dumps(dict(_embed(), job="other")))
  with pytest.raises(run_summary.SummaryError, match="job"):
    run_summary.read(str(path))
