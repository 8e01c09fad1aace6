"""Loopback servers that hold a client before any response header arrives.

``SlowHeaders(address, mode)`` listens on ``address`` (a 127.0.0.x) and, for
every connection, either sends nothing at all (``mode="silent"``: the
connection is accepted and the request read, no byte comes back) or sends
a valid status line and headers one byte every ``pause`` seconds
(``mode="trickle"``: never silent long enough to trip a read timeout).
It records how long each connection stayed open, so a test can check that
the client hung up by its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import List

_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
         b"X-Padding: " + b"x" * 200 + b"\r\nContent-Length: 4\r\n\r\n")


class SlowHeaders:
  """A listener that stalls every response before its headers are done."""

  def __init__(self, address: str, mode: str, pause: float = 0.2):
    self.mode = mode
    self.pause = pause
    self.held_s: List[float] = []  # seconds each connection stayed open
    self.connections = 0
    self._lock = threading.Lock()
    self._sock = socket.socket()
    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._sock.bind((address, 0))
    self._sock.listen(64)
    host, port = self._sock.getsockname()
    self._base = f"http://{host}:{port}"
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._serve, daemon=True)

  @property
  def base(self) -> str:
    return self._base

  def __enter__(self) -> "SlowHeaders":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._sock.close()

  def _serve(self) -> None:
    while not self._stop.is_set():
      try:
        conn, _ = self._sock.accept()
      except OSError:
        return
      with self._lock:
        self.connections += 1
      threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

  def _hold(self, conn: socket.socket) -> None:
    start = time.monotonic()
    conn.settimeout(self.pause)
    sent = 0
    try:
      conn.recv(65536)  # the request
      while not self._stop.is_set():
        if self.mode == "trickle" and sent < len(_HEAD):
          conn.sendall(_HEAD[sent:sent + 1])
          sent += 1
        try:  # b"" (or a reset): the client hung up
          if conn.recv(1) == b"":
            break
        except socket.timeout:
          pass
    except OSError:
      pass
    finally:
      with self._lock:
        self.held_s.append(time.monotonic() - start)
      conn.close()
