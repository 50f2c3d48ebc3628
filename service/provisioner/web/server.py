"""The HTTP server `serve` runs the app in (cheroot)."""

from __future__ import annotations

from bottle import Bottle
from cheroot import wsgi

from provisioner.config import Config


def make_server(config: Config, app: Bottle, host: str, port: int) -> wsgi.Server:
    """A cheroot server sized so slow clients cannot hold every thread."""
    return wsgi.Server((host, port), app, numthreads=config.server_threads)
