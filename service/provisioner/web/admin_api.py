"""The admin JSON API and Prometheus metrics: Basic or bearer auth, JSON-only POSTs."""

from __future__ import annotations

from bottle import request, response
from pony.orm import db_session

from provisioner import admin, docker_facts, metrics
from provisioner.states import StoreState
from provisioner.web.common import Route, Web, json_response, or_404, page_args

STATUSES = tuple(state.value for state in StoreState)
MAX_SEARCH = 200


def instances(web: Web):
    page, per_page = page_args()
    status = request.query.get("status") or None
    if status and status not in STATUSES:
        return json_response(400, {"error": f"status must be one of {', '.join(STATUSES)}"})
    with db_session:
        return json_response(200, admin.list_instances(
            web.config, status=status, q=search_text(), page=page, per_page=per_page))


def instance(web: Web, instance_id: int):
    with db_session:
        return json_response(200, or_404(admin.instance_detail, web.config, instance_id))


def act(web: Web, instance_id: int, action: str):
    web.check_api_post()
    try:
        job_id = web.queue_action(instance_id, action)
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    return json_response(202, {"job_id": job_id, "status_url": f"/api/jobs/{job_id}/"})


def retry(web: Web, instance_id: int):
    web.check_api_post()
    try:
        with db_session:
            result = or_404(admin.retry_store, web.config, instance_id, web.actor())
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    web.notify_worker()
    job_id = result["job_id"]
    return json_response(202, {**result,
                               "status_url": f"/api/jobs/{job_id}/" if job_id else None})


def apply_plan(web: Web, instance_id: int):
    web.check_api_post()
    try:
        with db_session:
            result = or_404(admin.apply_plan, web.config, instance_id, web.actor())
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    web.notify_worker()
    job_id = result["job_id"]
    return json_response(202, {**result,
                               "status_url": f"/api/jobs/{job_id}/" if job_id else None})


def search_text() -> str | None:
    return (request.query.get("q") or "")[:MAX_SEARCH] or None


def webhooks(web: Web):
    page, per_page = page_args()
    outcome = request.query.get("outcome") or None
    if outcome and outcome not in admin.WEBHOOK_OUTCOMES:
        return json_response(400, {
            "error": f"outcome must be one of {', '.join(admin.WEBHOOK_OUTCOMES)}"})
    with db_session:
        return json_response(200, admin.list_webhooks(outcome, search_text(), page, per_page))


def event(web: Web, event_id: int):
    with db_session:
        return json_response(200, or_404(admin.event_detail, event_id))


def replay(web: Web, event_id: int):
    web.check_api_post()
    try:
        with db_session:
            job_id = or_404(admin.replay_event, event_id, web.actor()).id
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    web.notify_worker()
    return json_response(202, {"job_id": job_id, "status_url": f"/api/jobs/{job_id}/"})


def audit(web: Web):
    page, per_page = page_args()
    with db_session:
        return json_response(200, admin.list_audit(
            search_text(), page, per_page, target=request.query.get("target") or None))


def instance_health(web: Web, instance_id: int):
    with db_session:
        store = or_404(admin.get_instance, instance_id)
        return json_response(200, docker_facts.live_health(web.config, store))


def instance_stats(web: Web, instance_id: int):
    with db_session:
        store = or_404(admin.get_instance, instance_id)
        return json_response(200, docker_facts.live_stats(web.config, store))


def customers(web: Web):
    page, per_page = page_args()
    with db_session:
        return json_response(200, admin.list_customers(page, per_page))


def stats(web: Web):
    with db_session:
        return json_response(200, admin.stats(web.config))


def job(web: Web, job_id: int):
    with db_session:
        return json_response(200, or_404(admin.job_detail, job_id))


def run(web: Web, run_id: int):
    with db_session:
        return json_response(200, or_404(admin.run_detail, web.config, run_id))


def prometheus(web: Web):
    response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    with db_session:
        return metrics.render(web.webhook_metrics)


ROUTES = (
    Route("GET", "/api/instances/", instances, auth="api"),
    Route("GET", "/api/instances/<instance_id:int>/", instance, auth="api"),
    *(Route("POST", f"/api/instances/<instance_id:int>/{action}/", act, auth="api",
            fixed={"action": action}) for action in ("start", "stop", "restart")),
    Route("POST", "/api/instances/<instance_id:int>/retry/", retry, auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/apply-plan/", apply_plan, auth="api"),
    Route("GET", "/api/instances/<instance_id:int>/health/", instance_health, auth="api"),
    Route("GET", "/api/instances/<instance_id:int>/stats/", instance_stats, auth="api"),
    Route("GET", "/api/customers/", customers, auth="api"),
    Route("GET", "/api/stats/", stats, auth="api"),
    Route("GET", "/api/jobs/<job_id:int>/", job, auth="api"),
    Route("GET", "/api/runs/<run_id:int>/", run, auth="api"),
    Route("GET", "/api/webhooks/", webhooks, auth="api"),
    Route("GET", "/api/events/<event_id:int>/", event, auth="api"),
    Route("POST", "/api/events/<event_id:int>/replay/", replay, auth="api"),
    Route("GET", "/api/audit/", audit, auth="api"),
    Route("GET", "/metrics", prometheus, auth="api"),
)
