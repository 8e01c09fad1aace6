"""s3:// without credentials: Beam's S3 client made to read public buckets.

When boto3 finds no credentials, Beam's S3 client sends unsigned requests
(like ``aws --no-sign-request``), and a client without a configured region
uses ``us-east-1``.  An S3-compatible store is reached through Beam's
``--s3_endpoint_url`` or the standard ``AWS_ENDPOINT_URL_S3`` variable,
which boto3 reads itself.  ``install_unsigned_s3`` runs when
``transforms.fetch`` is imported.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Tuple

_LOCK = threading.Lock()
_S3_CLIENTS: Dict[Tuple, object] = {}
def _s3_client(kwargs: dict):
  """A boto3 S3 client for Beam's options, made once per process.

  Unsigned (like ``aws --no-sign-request``) when neither the options nor
  boto3's usual chain (environment, config files, instance metadata) give
  credentials; in us-east-1 when no region is configured anywhere.  boto3
  clients are thread-safe, and credentials that expire (roles, instance
  profiles) are refreshed by the client itself.
  """
  import boto3  # pylint: disable=import-outside-toplevel
  from botocore import UNSIGNED  # pylint: disable=import-outside-toplevel
  from botocore.config import Config  # pylint: disable=import-outside-toplevel
  key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
  with _LOCK:
    if key in _S3_CLIENTS:
      return _S3_CLIENTS[key]
  session = boto3.session.Session()
  kwargs = dict(kwargs)
  if kwargs.get("aws_access_key_id") is None and (
      session.get_credentials() is None):
    logging.info("no AWS credentials found: s3:// is read unsigned (public "
                 "buckets only)")
    config = Config(signature_version=UNSIGNED)
    if kwargs.get("config") is not None:
      config = kwargs["config"].merge(config)
    kwargs["config"] = config
  if not kwargs.get("region_name") and not session.region_name:
    kwargs["region_name"] = "us-east-1"
  client = session.client(**kwargs)
  with _LOCK:
    return _S3_CLIENTS.setdefault(key, client)


def install_unsigned_s3() -> None:
  """Makes Beam's S3 client read public buckets without credentials.

  Beam builds a new boto3 session and client for every S3 call, from its
  ``--s3_*`` options; boto3 then signs every request and fails with
  NoCredentialsError when it finds no credentials (after a probe of the
  instance metadata service, on every call).  What Beam's client module
  calls ``boto3`` is replaced by a shim whose sessions hand out one client
  per process and options, made by ``_s3_client``.
  """
  try:
    from apache_beam.io.aws.clients.s3 import boto3_client  # pylint: disable=import-outside-toplevel
    import boto3  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return
  if getattr(boto3_client, "_natvision_shared_clients", False):
    return

  class _Session:
    """What Beam's client calls ``boto3.session.Session()``."""

    def client(self, **kwargs):
      return _s3_client(kwargs)

  class _Boto3:
    """What Beam's client module calls ``boto3``."""
    session = type("session", (), {"Session": _Session})

  boto3_client.boto3 = _Boto3()
  boto3_client._natvision_shared_clients = True  # pylint: disable=protected-access



