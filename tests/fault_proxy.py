"""Fault injection for the loopback GCS server: fail chosen storage calls.

The proxy in tests/gcs_server.py, in front of fake-gcs-server, consults a
`FaultPlan` for every request it receives and for every part of a batch
request (Beam renames and deletes with batches of copies and deletes).  A
rule chooses requests by HTTP method and a regular expression on the
request target, and fails them from its k-th match on, once, a few times
or always, in one of these ways:

  ``403``, ``429``, ``503``
      An HTTP error with a GCS-style JSON body.  In a batch, that part's
      status (the way GCS answers a batch whose parts fail).
  ``reset``
      The TCP connection is reset (RST) instead of an answer.  A batch part
      resets the whole batch request.
  ``timeout``
      No answer for ``hold_s`` seconds, then the connection is closed.  The
      storage client's own read timeout is 60 s, too long for tests; it
      handles a connection closed without an answer the same way (a
      connection error that it retries for idempotent calls).

With ``forward`` a ``reset`` or ``timeout`` is applied to the server
first, so only the answer is lost (a delete that happened although the
client saw an error).

The target a rule matches is the request's path and query, percent-decoded
(``/storage/v1/b/bkt/o/out/run.json``, ``/storage/v1/b/bkt/o?prefix=out/``).
A resumable upload's data requests carry only an upload id; the proxy
appends ``&name=<object>`` taken from the request that opened the upload,
so a rule can choose the writes of one object.

The test process drives the plan over HTTP, through the proxy itself, with
a `FaultInjector`::

  faults = FaultInjector(gcs_server.url)
  faults.clear()
  run_the_job()                        # a clean run
  calls = faults.log()                 # every storage call it made
  faults.clear()
  faults.add("GET", r"/o\\?.*prefix=out/_staging/", kind="403", from_match=2)
  run_the_job()                        # its 2nd listing of staging fails

Control endpoints (never logged, never failed):

  ``POST /_faults``        add a rule (JSON object, see `FaultRule`); answers
                           the rule with its ``id``
  ``GET /_faults``         the rules, each with ``matched`` and ``fired``
  ``DELETE /_faults``      remove every rule and empty the log
  ``GET /_faults/log``     the requests seen since the last clear, in order
  ``DELETE /_faults/log``  empty the log only

This module uses the standard library only: the proxy imports it in its own
process.
"""

import dataclasses
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Optional, Union

CONTROL_PREFIX = "/_faults"
HTTP_KINDS = {"403": "Forbidden", "429": "Too Many Requests",
              "503": "Service Unavailable"}
DROP_KINDS = ("reset", "timeout")
KINDS = tuple(HTTP_KINDS) + DROP_KINDS
ALWAYS = "always"
DEFAULT_HOLD_S = 1.0
MAX_LOG = 100_000

_ERROR_REASONS = {"403": "forbidden", "429": "rateLimitExceeded",
                  "503": "backendError"}


@dataclasses.dataclass
class FaultRule:
  """Which requests to fail, and how.

  Attributes:
    path_regex: searched (``re.search``) in the decoded request target.
    kind: one of `KINDS`.
    method: HTTP method to match, or ``*`` for any.
    from_match: the first matching request to fail (1 is the first match).
    times: how many matching requests to fail from there, or ``"always"``.
    hold_s: for ``timeout``, seconds to hold the request before closing.
    forward: for ``reset`` and ``timeout``, apply the request first.
    batch: None matches requests and batch parts alike; True only batch
      parts; False only requests sent on their own.
    id: set when the rule is added.
    matched, fired: how many requests matched it, and how many it failed.
  """

  path_regex: str
  kind: str
  method: str = "*"
  from_match: int = 1
  times: Union[int, str] = 1
  hold_s: float = DEFAULT_HOLD_S
  forward: bool = False
  batch: Optional[bool] = None
  id: int = 0
  matched: int = 0
  fired: int = 0

  def __post_init__(self):
    self.kind = str(self.kind)
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {', '.join(KINDS)}, got "
                       f"{self.kind!r}")
    self.method = self.method.upper()
    re.compile(self.path_regex)
    if int(self.from_match) < 1:
      raise ValueError("from_match counts from 1")
    self.from_match = int(self.from_match)
    if self.times != ALWAYS:
      if int(self.times) < 1:
        raise ValueError("times must be a positive number or 'always'")
      self.times = int(self.times)
    if self.forward and self.kind not in DROP_KINDS:
      raise ValueError("forward applies to reset and timeout only")

  def consider(self, method: str, target: str, batch: bool,
               can_fire: bool = True) -> bool:
    """Counts a request that matches; True when this one is to fail.

    Args:
      can_fire: False when an earlier rule already fails the request: it
        is counted as a match but takes nothing from ``times``.
    """
    if self.method not in ("*", method):
      return False
    if self.batch is not None and self.batch != batch:
      return False
    if not re.search(self.path_regex, target):
      return False
    self.matched += 1
    if self.matched < self.from_match or not can_fire:
      return False
    if self.times != ALWAYS and self.fired >= self.times:
      return False
    self.fired += 1
    return True


class FaultPlan:
  """The proxy's rules and request log; thread-safe.

  The proxy calls `decide` once per request (and per batch part) before
  doing anything with it, then `record` with the status the client got.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._rules: List[FaultRule] = []
    self._log: List[dict] = []
    self._next_id = 1
    self._uploads: Dict[str, str] = {}  # upload_id -> object name

  def add(self, spec: dict) -> FaultRule:
    fields = {f.name for f in dataclasses.fields(FaultRule)} - {
        "id", "matched", "fired"}
    unknown = set(spec) - fields
    if unknown:
      raise ValueError(f"unknown rule field(s): {', '.join(sorted(unknown))}")
    rule = FaultRule(**spec)
    with self._lock:
      rule.id = self._next_id
      self._next_id += 1
      self._rules.append(rule)
    return rule

  def clear(self, rules: bool = True) -> None:
    with self._lock:
      if rules:
        self._rules = []
      self._log = []

  def target(self, raw_path: str, body: Optional[bytes] = None) -> str:
    """The decoded target a rule matches (see the module docstring).

    Args:
      raw_path: the request's path and query, as sent.
      body: the request body; an upload that names its object only in its
        JSON metadata gets ``&name=<object>`` appended.
    """
    target = urllib.parse.unquote(raw_path)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(raw_path).query)
    if "name" in query:
      return target
    name = None
    upload_id = query.get("upload_id", [None])[0]
    if upload_id:
      with self._lock:
        name = self._uploads.get(upload_id)
    elif "uploadType" in query and body and body.lstrip().startswith(b"{"):
      try:
        name = json.loads(body).get("name")
      except (ValueError, AttributeError):
        name = None
    if name:
      target += "&name=" + name
    return target

  def decide(self, method: str, target: str, batch: bool
             ) -> "tuple[dict, Optional[FaultRule]]":
    """Logs a request; returns (log entry, the rule that fails it or None).

    Every rule that matches counts the request, even when an earlier rule
    already fails it, so that each rule's ``from_match`` counts the same
    requests whatever the other rules do.
    """
    with self._lock:
      chosen = None
      for rule in self._rules:
        if rule.consider(method, target, batch, can_fire=chosen is None):
          chosen = rule
      entry = {"seq": len(self._log) + 1, "method": method, "path": target,
               "batch": batch, "status": None,
               "fault": chosen.kind if chosen else None,
               "rule": chosen.id if chosen else None}
      if len(self._log) < MAX_LOG:
        self._log.append(entry)
    return entry, chosen

  def record(self, entry: dict, status: Optional[int],
             headers: Optional[list] = None) -> None:
    """Notes the status the client got; remembers resumable upload ids."""
    if entry is None:
      return  # the request failed before it was logged
    with self._lock:
      entry["status"] = status
      location = dict((k.lower(), v) for k, v in headers or ()).get(
          "location")
      if location and "uploadType=resumable" in entry["path"]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
        name = re.search(r"[?&]name=([^&]+)", entry["path"])
        if query.get("upload_id") and name:
          self._uploads[query["upload_id"][0]] = name.group(1)

  def rules(self) -> List[dict]:
    with self._lock:
      return [dataclasses.asdict(r) for r in self._rules]

  def log(self) -> List[dict]:
    with self._lock:
      return [dict(e) for e in self._log]

  def control(self, method: str, path: str, body: Optional[bytes]
              ) -> "tuple[int, object]":
    """Answers a request to a control endpoint: (status, JSON payload)."""
    route = urllib.parse.urlsplit(path).path.rstrip("/")
    try:
      if route == CONTROL_PREFIX and method == "POST":
        return 200, dataclasses.asdict(self.add(json.loads(body or b"{}")))
      if route == CONTROL_PREFIX and method == "GET":
        return 200, self.rules()
      if route == CONTROL_PREFIX and method == "DELETE":
        self.clear()
        return 200, {}
      if route == CONTROL_PREFIX + "/log" and method == "GET":
        return 200, self.log()
      if route == CONTROL_PREFIX + "/log" and method == "DELETE":
        self.clear(rules=False)
        return 200, {}
    except (ValueError, TypeError) as e:
      return 400, {"error": str(e)}
    return 404, {"error": f"no control endpoint {method} {route}"}


def is_control(path: str) -> bool:
  route = urllib.parse.urlsplit(path).path
  return route == CONTROL_PREFIX or route.startswith(CONTROL_PREFIX + "/")


def error_body(kind: str) -> bytes:
  """A GCS-style JSON error body for an HTTP fault."""
  code = int(kind)
  message = f"injected fault: {code} {HTTP_KINDS[kind]}"
  return json.dumps({"error": {"code": code, "message": message, "errors": [
      {"reason": _ERROR_REASONS[kind], "message": message}]}}).encode()


# --------------------------------------------------------------------------
# The test-side client.


class FaultInjector:
  """Drives the fault plan of a running proxy (see the module docstring).

  Args:
    url: the proxy's base URL (``FakeGcsServer.url``).
  """

  def __init__(self, url: str):
    self.url = url.rstrip("/")
    self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

  def _call(self, method: str, route: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(
        self.url + route, data=data, method=method,
        headers={"Content-Type": "application/json"})
    try:
      with self._opener.open(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
      raise ValueError(f"{method} {route}: {e.code} {e.read().decode()}"
                       ) from None

  def add(self, method: str, path_regex: str, kind: str = "403",
          from_match: int = 1, times: Union[int, str] = 1,
          **options) -> dict:
    """Adds a rule; returns it (with its id).

    Args:
      method: HTTP method, or ``*``.
      path_regex: searched in the decoded request target.
      kind: ``403``, ``429``, ``503``, ``reset`` or ``timeout``.
      from_match: fail from the k-th matching request on (1: the first).
      times: how many to fail, or ``"always"``.
      **options: ``hold_s``, ``forward``, ``batch`` (see `FaultRule`).

    Raises:
      ValueError: the proxy refused the rule (the message says why).
    """
    return self._call("POST", CONTROL_PREFIX, dict(
        method=method, path_regex=path_regex, kind=str(kind),
        from_match=from_match, times=times, **options))

  def rules(self) -> List[dict]:
    """The rules, each with how many requests it ``matched`` and ``fired``."""
    return self._call("GET", CONTROL_PREFIX)

  def log(self) -> List[dict]:
    """The requests seen since the last clear: seq, method, path, batch,
    status (None when the connection was dropped), fault, rule."""
    return self._call("GET", CONTROL_PREFIX + "/log")

  def clear(self) -> None:
    """Removes every rule and empties the log."""
    self._call("DELETE", CONTROL_PREFIX)

  def clear_log(self) -> None:
    self._call("DELETE", CONTROL_PREFIX + "/log")
