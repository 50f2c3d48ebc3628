"""A store's uptime history: its JSON for the admin API, and the store page's form that
shows or hides it on the public status page. The figures are provisioner.uptime's."""

from __future__ import annotations

from urllib.parse import quote

from bottle import HTTPResponse, redirect, request
from pony.orm import db_session

from provisioner import admin, uptime
from provisioner.web.common import Route, Web, json_response, or_404


def history(web: Web, instance_id: int):
    with db_session:
        store = or_404(admin.get_instance, instance_id)
        detail = uptime.detail(store, interval_minutes=web.config.health_interval_minutes)
        return json_response(200, {"subdomain": store.subdomain, **detail})


def page_set_public(web: Web, instance_id: int):
    """show=1 or show=0, not a toggle: a form sent twice leaves what the admin saw."""
    web.check_csrf()
    show = request.forms.get("show", "")
    if show not in ("0", "1"):
        raise HTTPResponse(status=400, body="show must be 1 (show) or 0 (hide)")
    with db_session:
        store = or_404(admin.get_instance, instance_id, page=True)
        changed = uptime.set_public(store, show == "1")
        said = "shown on" if show == "1" else "hidden from"
        admin.audit(web.actor(), "uptime-public", f"instance:{store.id}",
                    f"{store.subdomain}: uptime {said} the public status page"
                    + ("" if changed else " (already so)"))
    redirect(f"/admin/instances/{instance_id}/?flash={quote(f'uptime {said} the status page')}",
             303)


ROUTES = (
    Route("GET", "/api/instances/<instance_id:int>/uptime/", history, auth="api"),
    Route("POST", "/admin/instances/<instance_id:int>/uptime-public/", page_set_public,
          auth="page"),
)
