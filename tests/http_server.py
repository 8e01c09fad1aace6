"""A loopback HTTP photo server that can be slow and misbehave on purpose.

Serves named files (path -> bytes) on 127.0.0.x only, each response after an
optional latency.  ``plan(path, *responses)`` scripts the next requests of a
path: each scripted response is used once, in order, and then the file is
served normally.  A scripted response is one of:

- ``("status", code, headers, body)``: that status, headers and body;
- ``("redirect", location)``: a 302 to ``location``;
- ``("reset",)``: headers and half of the body, then a TCP reset;
- ``("short",)``: headers announcing the whole body, half of it, then a
  clean close (a body shorter than its Content-Length);
- ``("trickle", nbytes, pause)``: the file with its Content-Length, sent
  ``nbytes`` at a time with ``pause`` seconds between (a server that never
  goes silent long enough to trip a read timeout), until the client hangs
  up.

``always`` gives a scripted response used for every request that has none
of its own (a host that answers 503 to everything, or trickles every photo).

The server counts requests per path, records the User-Agent of each
request, and the peak number of requests in progress per Host header, so
tests and the benchmark can check the client's per-host cap.
"""

from __future__ import annotations

import collections
import http.server
import socket
import struct
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple


class PhotoServer:
  """One or more loopback listeners sharing one set of files and scripts.

  Args:
    files: URL path (``/a/b.jpg``) -> body.
    latency: seconds added before every response.
    hosts: loopback addresses to listen on (one listener each); photo hosts
      differ by address, as the hosts of a GBIF download do.
    content_type: Content-Type sent with files.
    always: a scripted response for every request without its own script.
  """

  def __init__(self, files: Dict[str, bytes], latency: float = 0.0,
               hosts: Sequence[str] = ("127.0.0.1",),
               content_type: str = "image/jpeg",
               always: Optional[Tuple] = None):
    self.files = dict(files)
    self.always = always
    self.latency = latency
    self.content_type = content_type
    self.requests: Dict[str, int] = collections.Counter()
    self.user_agents: List[str] = []
    self.peak: Dict[str, int] = collections.Counter()
    self._active: Dict[str, int] = collections.Counter()
    self._scripts: Dict[str, collections.deque] = collections.defaultdict(
        collections.deque)
    self._lock = threading.Lock()
    self._servers = []
    for host in hosts:
      server = http.server.ThreadingHTTPServer((host, 0), self._handler())
      server.daemon_threads = True
      self._servers.append(server)
    self._threads = [threading.Thread(target=s.serve_forever,
                                      kwargs={"poll_interval": 0.05},
                                      daemon=True)
                     for s in self._servers]

  def __enter__(self) -> "PhotoServer":
    for t in self._threads:
      t.start()
    return self

  def __exit__(self, *exc) -> None:
    for s in self._servers:
      s.shutdown()
      s.server_close()

  @property
  def bases(self) -> List[str]:
    """``http://host:port`` of each listener."""
    return [f"http://{s.server_address[0]}:{s.server_address[1]}"
            for s in self._servers]

  def url(self, path: str, listener: int = 0) -> str:
    return self.bases[listener] + path

  def plan(self, path: str, *responses: Tuple) -> None:
    """Scripts the next responses to ``path`` (see the module docstring)."""
    with self._lock:
      self._scripts[path].extend(responses)

  def _next(self, path: str) -> Optional[Tuple]:
    with self._lock:
      self.requests[path] += 1
      script = self._scripts.get(path)
      return script.popleft() if script else self.always

  def _enter(self, host: str, user_agent: str) -> None:
    with self._lock:
      self.user_agents.append(user_agent)
      self._active[host] += 1
      self.peak[host] = max(self.peak[host], self._active[host])

  def _leave(self, host: str) -> None:
    with self._lock:
      self._active[host] -= 1

  def _handler(self):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def do_GET(self):  # noqa: N802 - http.server's naming
        host = self.headers.get("Host", "")
        server._enter(host, self.headers.get("User-Agent", ""))
        try:
          if server.latency:
            time.sleep(server.latency)
          self._respond(server._next(self.path))
        finally:
          server._leave(host)

      def _send(self, code, headers, body):
        self.send_response(code)
        for name, value in headers.items():
          self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def _respond(self, script):
        body = server.files.get(self.path)
        if script is None:
          if body is None:
            self._send(404, {"Content-Type": "text/plain"}, b"no such photo")
          else:
            self._send(200, {"Content-Type": server.content_type}, body)
          return
        kind = script[0]
        if kind == "status":
          _, code, headers, payload = script
          self._send(code, headers, payload)
        elif kind == "trickle":
          _, nbytes, pause = script
          body = body or b""
          self.send_response(200)
          self.send_header("Content-Type", server.content_type)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          try:
            for start in range(0, len(body), nbytes):
              self.wfile.write(body[start:start + nbytes])
              self.wfile.flush()
              time.sleep(pause)
          except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up
        elif kind == "redirect":
          self._send(302, {"Location": script[1]}, b"")
        elif kind in ("reset", "short"):
          body = body or b""
          self.send_response(200)
          self.send_header("Content-Type", server.content_type)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body[:len(body) // 2])
          self.wfile.flush()
          if kind == "reset":  # SO_LINGER 0: close sends a TCP reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR) if kind == "short" else (
              self.connection.close())
        else:
          raise ValueError(f"unknown scripted response {script!r}")

    return Handler
