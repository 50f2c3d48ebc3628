"""The HTTP service, by audience: public routes, the admin API, the admin pages.

`create_app` only wires them; every route calls plain functions of the other
modules and no route calls another.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from bottle import BaseRequest, Bottle, response

from provisioner.config import Config
from provisioner.web import (
    account,
    admin_api,
    admin_pages,
    backups,
    domains,
    moves,
    public,
    uptime,
)
from provisioner.web.common import MAX_BODY_BYTES, Web, add_security_headers


def _json_error(error) -> str:
    response.content_type = "application/json"
    return json.dumps({"error": error.body if isinstance(error.body, str) else "error"})


def create_app(config: Config, wake: threading.Event | None = None,
               on_event_recorded: Callable[[], None] | None = None) -> Bottle:
    """The app for this config; `wake` is set when new work is queued."""
    # Any body we accept stays in memory: Bottle would spill those over 100 KB to a
    # temporary file (a full /tmp then fails a webhook).
    BaseRequest.MEMFILE_MAX = MAX_BODY_BYTES
    app = Bottle()
    web = Web(config, wake=wake, on_event_recorded=on_event_recorded)
    for group in (public, account, admin_api, admin_pages, backups, uptime, domains, moves):
        for route in group.ROUTES:
            app.route(route.path, route.method, web.bind(route))
    app.add_hook("after_request", add_security_headers)
    for status_code in (400, 404, 405, 413, 500):
        app.error(status_code)(_json_error)
    return app
