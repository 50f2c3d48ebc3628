"""The admin pages: Basic auth, a CSRF token on every form, phone-width HTML."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from bottle import redirect, request
from pony.orm import db_session

from provisioner import admin, docker_facts
from provisioner.states import JobState
from provisioner.web.admin_api import STATUSES
from provisioner.web.common import Route, Web, or_404, render

PAGE_ACTIONS = ("start", "stop", "restart", "suspend", "unsuspend")
PER_PAGE = 50
MAX_PAGE = 10**6


def dashboard(web: Web):
    with db_session:
        return render("admin/dashboard.html", **admin.dashboard(web.config), refresh=10)


def instances(web: Web):
    status = request.query.get("status") or None
    if status not in STATUSES:
        status = None
    q = _search_text()
    with db_session:
        listing = admin.list_instances(web.config, status=status, q=q, page=_page_number(),
                                       per_page=PER_PAGE)
    return render("admin/instances.html", statuses=STATUSES, status=status, q=q,
                  listing=listing, paging=_paging(listing, status=status, q=q))


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


def instance_retry(web: Web, instance_id: int):
    web.check_csrf()
    try:
        with db_session:
            result = or_404(admin.retry_store, web.config, instance_id, web.actor(), page=True)
    except admin.Conflict as exc:
        flash = str(exc)
    else:
        web.notify_worker()
        flash = f"retry queued as job {result['job_id']}" if result["job_id"] else \
            f"retry recorded; nothing to run while billing says {result['desired_state']}"
    redirect(f"/admin/instances/{instance_id}/?flash={quote(flash)}", 303)


def instance_apply_plan(web: Web, instance_id: int):
    web.check_csrf()
    try:
        with db_session:
            result = or_404(admin.apply_plan, web.config, instance_id, web.actor(), page=True)
    except admin.Conflict as exc:
        flash = str(exc)
    else:
        web.notify_worker()
        flash = f"plan {result['plan']['name']} will be applied (job {result['job_id']})"
    redirect(f"/admin/instances/{instance_id}/?flash={quote(flash)}", 303)


def _search_text() -> str | None:
    return (request.query.get("q") or "")[:200] or None


def _page_number() -> int:
    """Pages forgive a bad page number (the first page), unlike the API's 400."""
    text = request.query.get("page") or "1"
    whole = text.isascii() and text.isdigit() and len(text) <= 7
    return int(text) if whole and 1 <= int(text) <= MAX_PAGE else 1


def _paging(listing: dict, **filters) -> dict:
    """Links to the previous and next page, keeping the filters."""
    kept = {name: value for name, value in filters.items() if value}

    def link(number: int) -> str:
        return "?" + urlencode({**kept, "page": number})

    page, last = listing["page"], max(1, -(-listing["total"] // listing["per_page"]))
    return {"page": page, "last": last, "prev": link(page - 1) if page > 1 else None,
            "next": link(page + 1) if page < last else None}


def webhooks(web: Web):
    outcome = request.query.get("outcome") or None
    if outcome not in admin.WEBHOOK_OUTCOMES:
        outcome = None
    q = (request.query.get("q") or "")[:200] or None
    with db_session:
        listing = admin.list_webhooks(outcome, q, _page_number(), PER_PAGE)
    return render("admin/webhooks.html", listing=listing, outcomes=admin.WEBHOOK_OUTCOMES,
                  outcome=outcome, q=q, paging=_paging(listing, outcome=outcome, q=q),
                  csrf=web.csrf_token())


def event(web: Web, event_id: int):
    with db_session:
        detail = or_404(admin.event_detail, event_id, page=True)
    return render("admin/event.html", e=detail, csrf=web.csrf_token(),
                  flash=request.query.get("flash"),
                  refresh=2 if detail["state"] == "queued" else None)


def event_replay(web: Web, event_id: int):
    web.check_csrf()
    try:
        with db_session:
            job_id = or_404(admin.replay_event, event_id, web.actor(), page=True).id
    except admin.Conflict as exc:
        flash = str(exc)
    else:
        web.notify_worker()
        flash = f"replay queued as job {job_id}"
    redirect(f"/admin/events/{event_id}/?flash={quote(flash)}", 303)


def audit(web: Web):
    q = (request.query.get("q") or "")[:200] or None
    target = (request.query.get("target") or "")[:200] or None
    with db_session:
        listing = admin.list_audit(q, _page_number(), PER_PAGE, target=target)
    return render("admin/audit.html", listing=listing, q=q, target=target,
                  paging=_paging(listing, q=q, target=target))


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
        listing = admin.list_customers(_page_number(), PER_PAGE)
    return render("admin/customers.html", listing=listing, paging=_paging(listing))


ROUTES = (
    Route("GET", "/admin/", dashboard, auth="page"),
    Route("GET", "/admin/instances/", instances, auth="page"),
    Route("GET", "/admin/instances/<instance_id:int>/", instance, auth="page"),
    Route("POST", f"/admin/instances/<instance_id:int>/<action:re:{'|'.join(PAGE_ACTIONS)}>/",
          instance_action, auth="page"),
    Route("POST", "/admin/instances/<instance_id:int>/retry/", instance_retry, auth="page"),
    Route("POST", "/admin/instances/<instance_id:int>/apply-plan/", instance_apply_plan,
          auth="page"),
    Route("GET", "/admin/runs/", runs, auth="page"),
    Route("GET", "/admin/runs/<run_id:int>/", run, auth="page"),
    Route("GET", "/admin/customers/", customers, auth="page"),
    Route("GET", "/admin/webhooks/", webhooks, auth="page"),
    Route("GET", "/admin/events/<event_id:int>/", event, auth="page"),
    Route("POST", "/admin/events/<event_id:int>/replay/", event_replay, auth="page"),
    Route("GET", "/admin/audit/", audit, auth="page"),
)
