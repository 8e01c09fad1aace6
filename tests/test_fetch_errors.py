"""The fetch layer's errors: transient and not-found decided by type."""

from natvision.transforms import fetch



def test_typed_predicates():
  from apache_beam.io.aws.clients.s3 import messages  # pylint: disable=import-outside-toplevel
  from botocore.exceptions import ClientError  # pylint: disable=import-outside-toplevel
  from google.api_core import exceptions as gexc  # pylint: disable=import-outside-toplevel
  import urllib3.exceptions as uexc  # pylint: disable=import-outside-toplevel

  def client_error(status, code):
    return ClientError({"Error": {"Code": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")

  assert fetch.is_transient(gexc.TooManyRequests("slow down"))
  assert fetch.is_transient(ConnectionResetError())
  assert fetch.is_transient(uexc.ProtocolError("x", ConnectionResetError()))
  assert fetch.is_transient(messages.S3ClientError("x", 503))
  assert fetch.is_transient(client_error(500, "InternalError"))
  assert not fetch.is_transient(gexc.Forbidden("no"))
  assert not fetch.is_transient(client_error(403, "AccessDenied"))
  assert not fetch.is_transient(FileNotFoundError("x"))
  assert fetch.is_not_found(gexc.NotFound("x"))
  assert fetch.is_not_found(client_error(404, "NoSuchKey"))
  assert fetch.is_not_found(messages.S3ClientError("x", 404))
  # Messages and class names decide nothing.
  assert not fetch.is_not_found(RuntimeError("object not found"))
  named = type("ServiceUnavailable", (Exception,), {})
  assert not fetch.is_transient(named("503"))
  wrapped = RuntimeError("outer")
  wrapped.__cause__ = gexc.ServiceUnavailable("inner")
  assert fetch.is_transient(wrapped)
