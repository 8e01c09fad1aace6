"""Photo identity: stable ids and refs."""

from natvision.transforms import refs
from natvision.transforms import uris


def test_image_id_is_stable_and_distinct():
  a = refs.image_id_for_uri("gs://b/x.jpg")
  assert a == refs.image_id_for_uri("gs://b/x.jpg")
  assert a != refs.image_id_for_uri("gs://b/y.jpg")
  assert len(a) == 20

def test_a_name_that_is_not_utf8_reads_as_text_and_opens_the_file():
  raw = b"/photos/caf\xe9.jpg".decode("utf-8", "surrogateescape")
  ref = refs.ref_for_uri(raw)
  assert ref.uri == uris.readable(raw) and ref.path == raw
  assert ref.image_id == refs.image_id_for_uri(raw)
  assert refs.ref_for_uri("/photos/a.jpg").path is None
  assert refs.as_str(b"caf\xe9") == raw[len("/photos/"):-len(".jpg")]
