"""Moving a store to another Docker host: the admin API and the store page's form.
The work is admin.move_store; these only carry it."""

from __future__ import annotations

from bottle import request

from provisioner import admin
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


def move(web: Web, instance_id: int):
    web.check_api_post()
    docker_host = text_field(json_body(), "docker_host")
    if not docker_host:
        return json_response(400, {"error": "docker_host (the host to move to) is required"})
    return queued(web, lambda: or_404(admin.move_store, web.config, instance_id, docker_host,
                                      web.actor()))


def page_move(web: Web, instance_id: int):
    def work():
        # Read only once check_csrf (in page_request) has accepted the form.
        return admin.move_store(web.config, instance_id,
                                (request.forms.get("docker_host") or "")[:200], web.actor())

    page_request(web, instance_id, work,
                 lambda r: f"move from {r['from']} to {r['to']} queued as job {r['job_id']}")


ROUTES = (
    Route("POST", "/api/instances/<instance_id:int>/move/", move, auth="api"),
    Route("POST", "/admin/instances/<instance_id:int>/move/", page_move, auth="page"),
)
