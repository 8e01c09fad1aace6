"""transforms/records.py: the typed records that flow between stages.

They are frozen (a stage cannot change what another one holds), an
``ImageRef`` reads from its ``path`` when the name is not valid text and
from its ``uri`` otherwise, and its routing and carried columns read as
documented.
"""

import dataclasses

import numpy as np
import pytest

from natvision.transforms import records


def test_image_ref_reads_from_path_when_given_and_routes():
  ref = records.ImageRef("id1", "/p/caf\\xe9.jpg",
                         extra=(("site", "a"), ("n", 2)),
                         path="/p/caf\udce9.jpg", models=("m1",))
  assert ref.location == "/p/caf\udce9.jpg"
  assert records.ImageRef("id1", "/p/a.jpg").location == "/p/a.jpg"
  assert ref.extra_dict() == {"site": "a", "n": 2}
  assert ref.routed_to("m1") and not ref.routed_to("m2")
  assert records.ImageRef("id1", "/p/a.jpg").routed_to("any model")


def test_records_are_frozen_and_compare_by_value():
  ref = records.ImageRef("id1", "/p/a.jpg")
  with pytest.raises(dataclasses.FrozenInstanceError):
    ref.uri = "/p/b.jpg"
  assert ref == records.ImageRef("id1", "/p/a.jpg")
  assert hash(ref) == hash(records.ImageRef("id1", "/p/a.jpg"))
  error = records.ErrorRecord(ref, records.STAGE_DECODE, "bad bytes")
  assert error.model is None  # an error before any model
  with pytest.raises(dataclasses.FrozenInstanceError):
    error.stage = records.STAGE_READ
  result = records.EmbeddingResult(ref, "m", np.zeros(4, np.float32),
                                   640, 480, 320, 240)
  with pytest.raises(dataclasses.FrozenInstanceError):
    result.model = "other"


def test_field_names_and_stage_names():
  assert [f.name for f in dataclasses.fields(records.PredictionResult)] == [
      "ref", "model", "label_ids", "scores", "labels", "source_width",
      "source_height", "decoded_width", "decoded_height", "taxon_ids",
      "rollup"]
  assert records.RollUpResult._fields == ("taxon_id", "name", "rank",
                                          "score")
  assert [f.name for f in dataclasses.fields(records.PreparedImage)] == [
      "ref", "arrays", "source_width", "source_height", "decoded_width",
      "decoded_height"]
  assert (records.STAGE_READ, records.STAGE_DECODE, records.STAGE_PREPARE,
          records.STAGE_INFERENCE) == ("read", "decode", "prepare",
                                       "inference")
  assert records.ERRORS_TAG == "errors"
