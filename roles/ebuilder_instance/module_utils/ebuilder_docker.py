"""The local Docker engine API for the role's modules: a unix:// or plain tcp:// call
with a JSON answer, no Docker SDK needed on the host."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: int):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def docker_request(docker_host: str, method: str, path: str, timeout: int,
                   body: dict | None = None) -> tuple[int, dict]:
    """One call of the Docker engine API (unix:// or plain tcp://): status and JSON."""
    url = urllib.parse.urlparse(docker_host)
    if url.scheme == "unix":
        connection = _UnixConnection(url.path, timeout)
    elif url.scheme in ("tcp", "http"):
        connection = http.client.HTTPConnection(url.hostname, url.port or 2375, timeout=timeout)
    else:
        raise ValueError(f"docker_host {docker_host}: only unix:// and tcp:// are read here")
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={} if body is None else {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw) if raw else {}
        except ValueError:
            return response.status, {"message": raw.decode(errors="replace").strip()}
    finally:
        connection.close()
