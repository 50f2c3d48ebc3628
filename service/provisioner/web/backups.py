"""Backups, restore and clone of a store: the admin API and the store page's forms.
The work is admin.backup_store / restore_store / clone_store; these only carry it."""

from __future__ import annotations

from urllib.parse import quote

from bottle import redirect, request
from pony.orm import db_session

from provisioner import admin, backups
from provisioner.web.common import Route, Web, json_body, json_response, or_404


def _queued(web: Web, work) -> object:
    """Run an admin request: 202 with its job, 409 with why it was refused."""
    try:
        with db_session:
            result = work()
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    web.notify_worker()
    return json_response(202, {**result, "status_url": f"/api/jobs/{result['job_id']}/"})


def _text(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return None if value is None else str(value)
    if not isinstance(value, str) or len(value) > 500:
        raise json_response(400, {"error": f"{name} must be a number or text of at most "
                                           "500 characters"})
    return value


def listing(web: Web, instance_id: int):
    with db_session:
        store = or_404(admin.get_instance, instance_id)
        return json_response(200, {"instance_id": store.id, "items": backups.listing(store)})


def backup(web: Web, instance_id: int):
    web.check_api_post()
    json_body()
    return _queued(web, lambda: or_404(admin.backup_store, instance_id, web.actor()))


def restore(web: Web, instance_id: int):
    web.check_api_post()
    which = _text(json_body(), "backup")
    return _queued(web, lambda: or_404(admin.restore_store, instance_id, which, web.actor()))


def clone(web: Web, instance_id: int):
    web.check_api_post()
    body = json_body()
    subdomain, which = _text(body, "subdomain"), _text(body, "backup")
    if not subdomain:
        return json_response(400, {"error": "subdomain (the clone's name) is required"})
    return _queued(web, lambda: or_404(admin.clone_store, web.config, instance_id, subdomain,
                                       which, web.actor()))


def _page_request(web: Web, instance_id: int, work, said) -> None:
    web.check_csrf()  # first: nothing of a foreign or malformed form is read before
    try:
        with db_session:
            result = or_404(work, page=True)
    except admin.Conflict as exc:
        flash = str(exc)
    else:
        web.notify_worker()
        flash = said(result)
    redirect(f"/admin/instances/{instance_id}/?flash={quote(flash)}", 303)


def page_backup(web: Web, instance_id: int):
    _page_request(web, instance_id, lambda: admin.backup_store(instance_id, web.actor()),
                  lambda r: f"backup queued as job {r['job_id']}")


def _field(name: str, limit: int) -> str:
    """A form field, read only once check_csrf has accepted the form."""
    return (request.forms.get(name) or "")[:limit]


def page_restore(web: Web, instance_id: int):
    _page_request(web, instance_id,
                  lambda: admin.restore_store(instance_id, _field("backup", 20) or None,
                                              web.actor()),
                  lambda r: f"restore of backup {r['backup']['id']} queued as job {r['job_id']}")


def page_clone(web: Web, instance_id: int):
    _page_request(web, instance_id,
                  lambda: admin.clone_store(web.config, instance_id, _field("subdomain", 100),
                                            None, web.actor()),
                  lambda r: f"clone {r['subdomain']} (store {r['clone_id']}) queued as job "
                            f"{r['job_id']}")


ROUTES = (
    Route("GET", "/api/instances/<instance_id:int>/backups/", listing, auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/backups/", backup, auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/restore/", restore, auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/clone/", clone, auth="api"),
    Route("POST", "/admin/instances/<instance_id:int>/backup/", page_backup, auth="page"),
    Route("POST", "/admin/instances/<instance_id:int>/restore/", page_restore, auth="page"),
    Route("POST", "/admin/instances/<instance_id:int>/clone/", page_clone, auth="page"),
)
