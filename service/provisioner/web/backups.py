"""Backups, restore and clone of a store: the admin API and the store page's forms.
The work is admin.backup_store / restore_store / clone_store; these only carry it."""

from __future__ import annotations

from bottle import request
from pony.orm import db_session

from provisioner import admin, backups
from provisioner.web.common import (
    Route,
    Web,
    json_body,
    json_response,
    or_404,
    page_request,
    queued,
    text_field,
)


def listing(web: Web, instance_id: int):
    with db_session:
        store = or_404(admin.get_instance, instance_id)
        return json_response(200, {"instance_id": store.id, "items": backups.listing(store)})


def backup(web: Web, instance_id: int):
    web.check_api_post()
    json_body()
    return queued(web, lambda: or_404(admin.backup_store, instance_id, web.actor()))


def restore(web: Web, instance_id: int):
    web.check_api_post()
    which = text_field(json_body(), "backup")
    return queued(web, lambda: or_404(admin.restore_store, instance_id, which, web.actor()))


def clone(web: Web, instance_id: int):
    web.check_api_post()
    body = json_body()
    subdomain, which = text_field(body, "subdomain"), text_field(body, "backup")
    if not subdomain:
        return json_response(400, {"error": "subdomain (the clone's name) is required"})
    return queued(web, lambda: or_404(admin.clone_store, web.config, instance_id, subdomain,
                                       which, web.actor()))


def page_backup(web: Web, instance_id: int):
    page_request(web, instance_id, lambda: admin.backup_store(instance_id, web.actor()),
                  lambda r: f"backup queued as job {r['job_id']}")


def _field(name: str, limit: int) -> str:
    """A form field, read only once check_csrf has accepted the form."""
    return (request.forms.get(name) or "")[:limit]


def page_restore(web: Web, instance_id: int):
    page_request(web, instance_id,
                  lambda: admin.restore_store(instance_id, _field("backup", 20) or None,
                                              web.actor()),
                  lambda r: f"restore of backup {r['backup']['id']} queued as job {r['job_id']}")


def page_clone(web: Web, instance_id: int):
    page_request(web, instance_id,
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
