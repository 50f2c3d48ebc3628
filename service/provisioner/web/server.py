"""The HTTP server `serve` runs the app in (cheroot), hardened against slow and odd clients.

Cheroot gives each request a thread from the moment its first byte arrives until the
answer is written. A client that trickles its request would hold that thread for as
long as it likes (each byte resets a plain socket timeout), and enough of them starve
Stripe's webhooks. So here:

- a request must arrive whole, headers and body, within REQUEST_READ_SECONDS of its
  connection being accepted (time queued for a thread counts), and a socket silent for
  SOCKET_TIMEOUT_SECONDS is dropped: a slow client holds a thread for seconds, however
  many of them come at once;
- the body is read before the app runs: at most MAX_BODY_BYTES (413 beyond, read no
  further), chunked bodies strictly; headers at most MAX_HEADER_BYTES; a malformed or
  short body is a 400, a late one a 408, each with its reason;
- a 5xx always means the service failed: an HTTP version or transfer coding it does not
  speak is the client's 400;
- the listen backlog takes bursts, and SERVER_THREADS threads serve requests.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import socket
import time

from bottle import Bottle
from cheroot import makefile, server, wsgi

from provisioner.config import Config
from provisioner.web.common import MAX_BODY_BYTES

REQUEST_READ_SECONDS = 10
SOCKET_TIMEOUT_SECONDS = 5
MAX_HEADER_BYTES = 64 * 1024
LISTEN_BACKLOG = 256
# After a refusal, how long and how much the server still reads so the client sees it.
LINGER_SECONDS = 1
LINGER_BYTES = 1024 * 1024
# The longest chunk-size line (with any extension) or trailer line read.
MAX_CHUNK_LINE = 1024
MAX_TRAILER_LINES = 32
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
M_ARENA_MAX = -8  # glibc's mallopt parameter number
CLIENT_FAULTS = {"501": "only the chunked transfer coding is accepted",
                 "505": "only HTTP/1.0 and HTTP/1.1 are spoken here"}


class _DeadlineSocketIO(socket.SocketIO):
    """Socket reads that wait for the client no later than the request's deadline. What
    the client sent in time (while its connection waited for a thread) is still read:
    past the deadline a read takes what has arrived and never waits for more."""

    deadline: float | None = None

    def readinto(self, buffer) -> int:
        if self.deadline is None:
            return super().readinto(buffer)
        timeout = self._sock.gettimeout()
        left = max(0.0, self.deadline - time.monotonic())
        self._sock.settimeout(min(left, timeout) if timeout else left)
        try:
            count = super().readinto(buffer)
        finally:
            self._sock.settimeout(timeout)
        if count is None:  # nothing there, and no time left to wait for it
            raise TimeoutError("timed out")  # the words cheroot answers 408 for
        return count


class _DeadlineReader(makefile.StreamReader):
    """Cheroot's buffered socket reader over a `_DeadlineSocketIO`."""

    def __init__(self, sock, mode: str = "rb", bufsize: int = io.DEFAULT_BUFFER_SIZE):
        makefile.io.BufferedReader.__init__(self, _DeadlineSocketIO(sock, mode), bufsize)
        self.bytes_read = 0


class _Refused(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class _NoUnderscoreHeaders(server.HeaderReader):
    """Drops headers named with `_`: `X_Forwarded_For` must not pass for `X-Forwarded-For`
    (both become one WSGI key). Cheroot's own DropUnderscoreHeaderReader mixes str and
    bytes and fails."""

    def _allow_header(self, key_name: bytes) -> bool:
        return super()._allow_header(key_name) and b"_" not in key_name


class BoundedRequest(server.HTTPRequest):
    """A request read whole, in bounded time and size, before the app sees it."""

    header_reader = _NoUnderscoreHeaders()

    def simple_response(self, status, msg="") -> None:
        """Cheroot's own answers, except that a client speaking an HTTP version or transfer
        coding we do not is told 400: a 5xx should always mean this service failed."""
        refusal = CLIENT_FAULTS.get(str(status)[:3])
        if refusal is not None:
            self.close_connection = True
            status, msg = "400 Bad Request", refusal
        # Refused part-way through: the rest may still be coming.
        self.conn.drain_on_close = str(status).startswith("4")
        super().simple_response(status, msg)

    def parse_request(self) -> None:
        self.conn.rfile.raw.deadline = self.conn.request_started() + REQUEST_READ_SECONDS
        super().parse_request()

    def respond(self) -> None:
        try:
            body = self._read_body()
        except _Refused as refusal:
            self.close_connection = True  # what is left of the request is garbage
            self.simple_response(refusal.status, refusal.reason)
            return
        # The app gets the body as if it had been sent with a Content-Length.
        self.chunked_read = False
        self.inheaders.pop(b"Transfer-Encoding", None)
        self.inheaders[b"Content-Length"] = str(len(body)).encode("ascii")
        self.rfile = server.KnownLengthRFile(io.BytesIO(body), len(body))
        self.conn.rfile.raw.deadline = None  # the app's time is not the client's
        self.server.gateway(self).respond()
        if self.ready:
            self.ensure_headers_sent()
        if self.chunked_write:
            self.conn.wfile.write(b"0\r\n\r\n")

    def _read_body(self) -> bytes:
        try:
            if self.chunked_read:
                return _read_chunked(self.conn.rfile)
            return _read_sized(self.conn.rfile, int(self.inheaders.get(b"Content-Length", 0)))
        except TimeoutError:
            raise _Refused("408 Request Timeout", "the request did not arrive in time "
                                                  f"(at most {SOCKET_TIMEOUT_SECONDS} s "
                                                  f"silent, {REQUEST_READ_SECONDS} s in all)"
                           ) from None


def _read_sized(rfile, length: int) -> bytes:
    if length < 0:
        raise _Refused("400 Bad Request", "Content-Length must not be negative")
    if length > MAX_BODY_BYTES:  # cheroot refused it with the headers already; defensive
        raise _Refused("413 Request Entity Too Large", _too_large())
    body = rfile.read(length)
    if len(body) < length:
        raise _Refused("400 Bad Request", "the body ended before Content-Length bytes")
    return body


def _read_chunked(rfile) -> bytes:
    """A chunked body, strictly (RFC 9112 7.1): hexadecimal sizes only, each chunk and the
    trailer section ended by CRLF. Cheroot's own reader takes "-1" or "0x5" as sizes and
    leaves trailers behind as the next request: both ways to smuggle a request."""
    body = bytearray()
    while True:
        size = _chunk_size(rfile.readline(MAX_CHUNK_LINE))
        if size == 0:
            break
        if len(body) + size > MAX_BODY_BYTES:
            raise _Refused("413 Request Entity Too Large", _too_large())
        data = rfile.read(size)
        if len(data) < size or rfile.read(2) != b"\r\n":
            raise _Refused("400 Bad Request", "malformed chunked body: a chunk is shorter "
                                              "than its size or not followed by CRLF")
        body += data
    for _ in range(MAX_TRAILER_LINES):
        line = rfile.readline(MAX_CHUNK_LINE)
        if line == b"\r\n":
            return bytes(body)
        if not line.endswith(b"\r\n"):
            break
    raise _Refused("400 Bad Request", "malformed chunked body: no end to its trailer section")


def _chunk_size(line: bytes) -> int:
    size = line.removesuffix(b"\r\n").split(b";", 1)[0].rstrip(b" \t")
    if not line.endswith(b"\r\n") or not CHUNK_SIZE.fullmatch(size):
        raise _Refused("400 Bad Request", "malformed chunked body: a chunk size must be "
                                          "hexadecimal digits on a line ending in CRLF")
    return int(size, 16)


def _too_large() -> str:
    return f"the body is larger than {MAX_BODY_BYTES} bytes"


class BoundedConnection(server.HTTPConnection):
    """A connection whose reads keep each request's deadline."""

    RequestHandlerClass = BoundedRequest
    drain_on_close = False  # set when a request is refused part-way through

    def __init__(self, server_, sock, makefile_=makefile.MakeFile):
        def files(sock, mode="r", bufsize=io.DEFAULT_BUFFER_SIZE):
            if "r" in mode:
                return _DeadlineReader(sock, mode, bufsize)
            return makefile_(sock, mode, bufsize)

        super().__init__(server_, sock, files)
        self.accepted_at: float | None = time.monotonic()

    def close(self) -> None:
        if self.drain_on_close:
            self._drain()
        super().close()

    def _drain(self) -> None:
        """Let the client read our refusal before the socket closes: closing with its
        unread bytes still arriving resets the connection, and the reset can destroy the
        answer (a 413) before the client reads it. So stop sending, then read and drop
        what is still coming, for a moment at most."""
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)
            while drained < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.socket.settimeout(left)
                chunk = self.socket.recv(65536)
                if not chunk:
                    return
                drained += len(chunk)

    def request_started(self) -> float:
        """When the request now being read began: the first one when the connection was
        accepted (time spent queued for a thread counts, so a crowd of slow clients
        expires together), later ones on a kept-alive connection now."""
        started, self.accepted_at = self.accepted_at, None
        return started if started is not None else time.monotonic()


def _few_malloc_arenas() -> None:
    """glibc gives each busy thread a malloc arena of its own; with SERVER_THREADS threads
    their fragments kept the process growing by tens of MB under varied traffic. Two
    arenas is what MALLOC_ARENA_MAX=2 would set (an explicit setting wins)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)


def make_server(config: Config, app: Bottle, host: str, port: int) -> wsgi.Server:
    """A cheroot server on which slow or malformed clients cannot starve the webhook."""
    _few_malloc_arenas()
    httpd = wsgi.Server((host, port), app, numthreads=config.server_threads,
                        timeout=SOCKET_TIMEOUT_SECONDS, request_queue_size=LISTEN_BACKLOG)
    httpd.ConnectionClass = BoundedConnection
    httpd.max_request_body_size = MAX_BODY_BYTES
    httpd.max_request_header_size = MAX_HEADER_BYTES
    return httpd
