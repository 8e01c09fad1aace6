"""A loopback S3 API server (moto's server mode) and an anonymous client env.

``s3_server`` starts moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free
port) once per test session.  Tests that use it run natvision with no AWS
credentials anywhere (``anonymous_aws``): no ``AWS_ACCESS_KEY_ID`` and
friends, empty config and credentials files, the instance metadata service
turned off, and ``AWS_ENDPOINT_URL_S3`` pointing at the server, so the job
reads the way it reads a public bucket, unsigned.  Objects are put there by
``S3Server.put`` with a client of its own, given fake keys explicitly (moto
does not check them), so nothing in the environment holds credentials.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import pytest

_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL")


@dataclasses.dataclass
class S3Server:
  """A running loopback S3 endpoint."""

  endpoint: str
  _client: object = None
  _public: dict = dataclasses.field(default_factory=dict)

  @property
  def client(self):
    """A boto3 client with fake keys, for the tests' own uploads."""
    if self._client is None:
      import boto3  # pylint: disable=import-outside-toplevel
      self._client = boto3.client(
          "s3", endpoint_url=self.endpoint, region_name="us-east-1",
          aws_access_key_id="test-only", aws_secret_access_key="test-only")
    return self._client

  def bucket(self, name: str, public: bool = True) -> str:
    """Creates a bucket (if needed); returns ``s3://name``.

    A public bucket lets anyone list and read it, as iNaturalist's open
    data bucket does; anonymous requests to a private one get 403.
    """
    try:
      self.client.create_bucket(Bucket=name,
                                ACL="public-read" if public else "private")
    except self.client.exceptions.BucketAlreadyOwnedByYou:
      pass
    self._public[name] = public
    return f"s3://{name}"

  def put(self, uri: str, data: bytes) -> None:
    bucket, _, key = uri[len("s3://"):].partition("/")
    self.client.put_object(
        Bucket=bucket, Key=key, Body=data,
        ACL="public-read" if self._public.get(bucket, True) else "private")

  def put_dir(self, local_dir: str, uri: str) -> None:
    """Uploads a local folder's files under ``uri``, keeping the layout."""
    for root, _, files in os.walk(local_dir):
      for name in files:
        path = os.path.join(root, name)
        rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
        with open(path, "rb") as f:
          self.put(f"{uri.rstrip('/')}/{rel}", f.read())

  def keys(self, bucket: str, prefix: str = ""):
    listing = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
  from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  try:
    yield S3Server(endpoint=f"http://{host}:{port}")
  finally:
    server.stop()


@pytest.fixture()
def anonymous_aws(s3_server, tmp_path, monkeypatch) -> S3Server:
  """No AWS credentials or region anywhere; S3 calls go to the server."""
  for name in _CREDENTIAL_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  empty = tmp_path / "aws_empty"
  empty.write_text("")
  monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
  monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
  monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
  monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
  # Clients are made once per process and options: start from none.
  from natvision.transforms import fetch  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(fetch.s3, "_S3_CLIENTS", {})
  return s3_server
