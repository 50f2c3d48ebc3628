"""Calling the Bottle app as a WSGI callable: real routing, no server."""

from __future__ import annotations

import base64
import io
import json


def call(app, method, path, body=None, headers=None, query="", raw=False,
         remote_addr="127.0.0.1"):
    if isinstance(body, bytes):
        data = body
    elif isinstance(body, dict | list):
        data = json.dumps(body).encode()
    else:
        data = b""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": str(len(data)),
               "CONTENT_TYPE": "application/json", "SERVER_NAME": "test", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "REMOTE_ADDR": remote_addr, "HTTP_HOST": "test"}
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = dict(response_headers)

    out = b"".join(app(environ, start_response))
    if raw:
        return captured["status"], out, captured["headers"]
    return captured["status"], json.loads(out or b"null")


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
