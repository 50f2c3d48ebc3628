"""The admin pages: Basic auth, a CSRF token on every form, phone-width HTML."""

from __future__ import annotations

from urllib.parse import quote

from bottle import redirect, request
from pony.orm import db_session

from provisioner import admin, docker_facts
from provisioner.states import JobState
from provisioner.web.admin_api import STATUSES
from provisioner.web.common import Route, Web, or_404, render

PAGE_ACTIONS = ("start", "stop", "restart", "suspend", "unsuspend")


def dashboard(web: Web):
    with db_session:
        return render("admin/dashboard.html", **admin.dashboard(web.config), refresh=10)


def instances(web: Web):
    status = request.query.get("status") or None
    if status not in STATUSES:
        status = None
    q = request.query.get("q") or None
    with db_session:
        return render("admin/instances.html", statuses=STATUSES, status=status, q=q,
                      page=admin.list_instances(web.config, status=status, q=q, per_page=200))


def instance(web: Web, instance_id: int):
    with db_session:
        detail = or_404(admin.instance_detail, web.config, instance_id, page=True)
        busy = any(j["state"] in (JobState.QUEUED, JobState.RUNNING) for j in detail["jobs"])
        health = docker_facts.live_health(web.config, admin.get_instance(instance_id)) \
            if detail["live"] and detail["provisioned_at"] else None
    return render("admin/instance.html", i=detail, health=health, csrf=web.csrf_token(),
                  flash=request.query.get("flash"), refresh=2 if busy else None)


def instance_action(web: Web, instance_id: int, action: str):
    web.check_csrf()
    try:
        flash = f"{action} queued as job {web.queue_action(instance_id, action, page=True)}"
    except admin.Conflict as exc:
        flash = str(exc)
    redirect(f"/admin/instances/{instance_id}/?flash={quote(flash)}", 303)


def runs(web: Web):
    with db_session:
        return render("admin/runs.html", runs=admin.list_runs(), refresh=10)


def run(web: Web, run_id: int):
    with db_session:
        detail = or_404(admin.run_detail, web.config, run_id, page=True)
    return render("admin/run.html", run=detail,
                  refresh=2 if detail["status"] == "running" else None)


def customers(web: Web):
    with db_session:
        return render("admin/customers.html", page=admin.list_customers(1, 200))


ROUTES = (
    Route("GET", "/admin/", dashboard, auth="page"),
    Route("GET", "/admin/instances/", instances, auth="page"),
    Route("GET", "/admin/instances/<instance_id:int>/", instance, auth="page"),
    Route("POST", f"/admin/instances/<instance_id:int>/<action:re:{'|'.join(PAGE_ACTIONS)}>/",
          instance_action, auth="page"),
    Route("GET", "/admin/runs/", runs, auth="page"),
    Route("GET", "/admin/runs/<run_id:int>/", run, auth="page"),
    Route("GET", "/admin/customers/", customers, auth="page"),
)
