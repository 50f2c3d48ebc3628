"""The HTTP service: thin routes over the plain functions of the other modules."""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urlparse

from bottle import Bottle, HTTPResponse, redirect, request, response
from jinja2 import Environment, PackageLoader, select_autoescape
from pony.orm import db_session, desc

from provisioner import admin, intake, metrics, openapi, subdomains
from provisioner.auth import Throttle, admin_required, deny, rate_limited
from provisioner.checkout import (
    CheckoutUnavailable,
    create_checkout_session,
    validate_email,
    validate_site_name,
)
from provisioner.config import Config
from provisioner.events import hold_subdomain
from provisioner.models import Instance, Job

log = logging.getLogger(__name__)
STATUSES = ("pending", "provisioning", "running", "stopped", "suspended", "cancelled",
            "destroyed", "failed", "needs_attention")


def json_response(status: int, body: dict) -> HTTPResponse:
    return HTTPResponse(status=status, body=json.dumps(body),
                        headers={"Content-Type": "application/json", "Cache-Control": "no-store"})


def _json_body() -> dict:
    try:
        body = json.loads(request.body.read() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise json_response(400, {"error": "body must be JSON"}) from None
    if not isinstance(body, dict):
        raise json_response(400, {"error": "body must be a JSON object"})
    return body


def _page_args() -> tuple[int, int]:
    try:
        page = int(request.query.get("page") or 1)
        per_page = int(request.query.get("per_page") or 50)
    except ValueError:
        raise json_response(400, {"error": "page and per_page must be integers"}) from None
    if page < 1 or not 1 <= per_page <= 200:
        raise json_response(400, {"error": "page >= 1 and 1 <= per_page <= 200"})
    return page, per_page


def same_origin(origin: str | None, host: str | None, public_url: str) -> bool:
    """Is a browser's Origin (or Referer) this service, by the Host it asked or our URL?"""
    if not origin:
        return True  # not a browser's cross-site request: browsers send Origin on POSTs
    netloc = urlparse(origin).netloc
    return bool(netloc) and netloc in {host, urlparse(public_url).netloc}


def security_headers(csp: str) -> dict[str, str]:
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
            "Cross-Origin-Opener-Policy": "same-origin"}


# Pages: only our own inline code, carrying this response's nonce; JSON: nothing at all.
PAGE_CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


def create_app(config: Config, wake: threading.Event | None = None,
               on_event_recorded: Callable[[], None] | None = None) -> Bottle:
    """Build the app for this config; `wake` is set when new work is queued."""
    app = Bottle()
    throttle = Throttle()
    admin_api = admin_required(config, throttle)
    admin_page = admin_required(config, throttle, json_errors=False)
    webhook_metrics = metrics.WebhookMetrics()
    csrf_key = secrets.token_bytes(32)
    pages = Environment(loader=PackageLoader("provisioner", "templates"),
                        autoescape=select_autoescape(["html"]))

    def render(template: str, **context) -> str:
        nonce = secrets.token_urlsafe(16)
        response.content_type = "text/html; charset=utf-8"
        response.set_header("Cache-Control", "no-store")
        response.set_header("Content-Security-Policy", PAGE_CSP.format(nonce=nonce))
        return pages.get_template(f"pages/{template}").render(nonce=nonce, **context)

    @app.hook("after_request")
    def add_security_headers():
        for name, value in security_headers(API_CSP).items():
            if name not in response.headers:
                response.set_header(name, value)

    def csrf_token() -> str:
        return hmac.new(csrf_key, config.admin_user.encode(), "sha256").hexdigest()

    def check_csrf() -> None:
        token = request.forms.get("csrf", "")
        if not hmac.compare_digest(token, csrf_token()):
            raise HTTPResponse(status=403, body="bad or missing CSRF token")
        origin = request.get_header("Origin") or request.get_header("Referer")
        if not same_origin(origin, request.get_header("Host"), config.public_url):
            raise HTTPResponse(status=403, body="cross-site request refused")

    def check_api_post() -> None:
        """State-changing API calls: JSON only and never from another site's page.

        A cross-site form can send neither a JSON content type nor our Origin, and
        a browser would resend cached Basic credentials with it."""
        if request.content_type.split(";")[0].strip().lower() != "application/json":
            raise deny(415, "send the request as Content-Type: application/json", True)
        if not same_origin(request.get_header("Origin"), request.get_header("Host"),
                           config.public_url):
            raise deny(403, "cross-site request refused", True)

    def notify_worker() -> None:
        if wake is not None:
            wake.set()
        if on_event_recorded is not None:
            on_event_recorded()

    def or_404(lookup, *args, page: bool = False):
        """Call an admin lookup; an unknown id answers 404 (JSON for the API, text for pages)."""
        try:
            return lookup(*args)
        except admin.NotFound as exc:
            raise (HTTPResponse(status=404, body=str(exc)) if page
                   else json_response(404, {"error": str(exc)})) from None

    def instance_or_404(instance_id: int) -> Instance:
        return or_404(admin.get_instance, instance_id)

    # -- public API ------------------------------------------------------------

    @app.post("/api/webhook/stripe/")
    def stripe_webhook():
        started = time.perf_counter()
        payload = request.body.read()
        try:
            event = intake.verify(payload, request.get_header("Stripe-Signature"),
                                  config.stripe_webhook_secret, config.stripe_webhook_tolerance)
        except intake.RejectedEvent as exc:
            log.warning("rejected webhook: %s", exc)
            webhook_metrics.observe("rejected", time.perf_counter() - started)
            return json_response(400, {"error": str(exc)})
        recorded = intake.record(event, payload)
        if not recorded.duplicate:
            notify_worker()
        elapsed = time.perf_counter() - started
        webhook_metrics.observe("duplicate" if recorded.duplicate else "recorded", elapsed)
        log.info("webhook %s %s%s in %.1f ms", recorded.type, recorded.stripe_id,
                 " (duplicate)" if recorded.duplicate else "", elapsed * 1000)
        return json_response(200, {"received": True, "duplicate": recorded.duplicate})

    @app.post("/api/check-subdomain/")
    @rate_limited(config, config.check_subdomain_per_minute)
    def check_subdomain():
        body = _json_body()
        try:
            with db_session:
                name = subdomains.check_available(body.get("subdomain"))
        except subdomains.SubdomainTaken as exc:
            return json_response(200, {"available": False, "reason": str(exc)})
        except subdomains.InvalidSubdomain as exc:
            return json_response(400, {"available": False, "error": str(exc)})
        return json_response(200, {"available": True, "subdomain": name,
                                   "url": config.store_url(name)})

    @app.post("/api/create-checkout/")
    @rate_limited(config, config.checkout_per_minute)
    def create_checkout():
        body = _json_body()
        try:
            site_name = validate_site_name(body.get("site_name"))
            email = validate_email(body.get("email"))
            with db_session:
                name = subdomains.check_available(body.get("subdomain"), email=email)
        except subdomains.SubdomainTaken as exc:
            return json_response(409, {"error": str(exc)})
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        try:
            session = create_checkout_session(config, name, site_name, email)
        except CheckoutUnavailable as exc:
            return json_response(503, {"error": str(exc)})
        with db_session:
            hold_subdomain(name, session["id"], email, session.get("expires_at"))
        return json_response(200, {"session_id": session["id"], "checkout_url": session["url"]})

    @app.get("/api/health/")
    def service_health():
        return json_response(200, {"status": "ok"})

    @app.get("/api/status/")
    def status_json():
        with db_session:
            return json_response(200, admin.public_status())

    @app.get("/api/openapi.json")
    def openapi_document():
        return json_response(200, openapi.document())

    # -- admin API -------------------------------------------------------------

    @app.get("/api/instances/")
    @admin_api
    def api_instances():
        page, per_page = _page_args()
        status = request.query.get("status") or None
        if status and status not in STATUSES:
            return json_response(400, {"error": f"status must be one of {', '.join(STATUSES)}"})
        with db_session:
            return json_response(200, admin.list_instances(
                config, status=status, q=request.query.get("q"), page=page, per_page=per_page))

    @app.get("/api/instances/<instance_id:int>/")
    @admin_api
    def api_instance(instance_id):
        with db_session:
            instance_or_404(instance_id)
            return json_response(200, admin.instance_detail(config, instance_id))

    def queue(instance_id: int, action: str) -> int:
        """Queue an admin action; its job id (NotFound, Conflict as admin raises them)."""
        with db_session:
            job_id = admin.queue_action(instance_id, action).id
        notify_worker()
        return job_id

    for action in ("start", "stop", "restart"):
        def act(instance_id, action=action):
            check_api_post()
            try:
                job_id = or_404(queue, instance_id, action)
            except admin.Conflict as exc:
                return json_response(409, {"error": str(exc)})
            return json_response(202, {"job_id": job_id, "status_url": f"/api/jobs/{job_id}/"})

        app.route(f"/api/instances/<instance_id:int>/{action}/", "POST", admin_api(act),
                  name=f"api_{action}")

    @app.get("/api/instances/<instance_id:int>/health/")
    @admin_api
    def api_instance_health(instance_id):
        with db_session:
            return json_response(200, admin.live_health(config, instance_or_404(instance_id)))

    @app.get("/api/instances/<instance_id:int>/stats/")
    @admin_api
    def api_instance_stats(instance_id):
        with db_session:
            return json_response(200, admin.live_stats(config, instance_or_404(instance_id)))

    @app.get("/api/customers/")
    @admin_api
    def api_customers():
        page, per_page = _page_args()
        with db_session:
            return json_response(200, admin.list_customers(page, per_page))

    @app.get("/api/stats/")
    @admin_api
    def api_stats():
        with db_session:
            return json_response(200, admin.stats(config))

    @app.get("/api/jobs/<job_id:int>/")
    @admin_api
    def api_job(job_id):
        with db_session:
            return json_response(200, or_404(admin.job_detail, job_id))

    @app.get("/api/runs/<run_id:int>/")
    @admin_api
    def api_run(run_id):
        with db_session:
            return json_response(200, or_404(admin.run_detail, config, run_id))

    @app.get("/metrics")
    @admin_api
    def prometheus():
        response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        with db_session:
            return metrics.render(webhook_metrics)

    # -- pages -----------------------------------------------------------------

    @app.get("/")
    @app.get("/signup/")
    def signup_page():
        return render("signup.html", base_domain=config.base_domain)

    @app.get("/signup/success/")
    def signup_success():
        return render("signup_done.html", heading="Thank you!",
                      text="Your payment went through. Your store is being built now; "
                           "you will get an email with its address and your login in a minute.")

    @app.get("/signup/cancelled/")
    def signup_cancelled():
        return render("signup_done.html", heading="Checkout cancelled",
                      text="Nothing was charged. You can start again whenever you like.")

    @app.get("/status/")
    def status_page():
        with db_session:
            return render("status.html", status=admin.public_status(), refresh=30)

    @app.get("/admin/")
    @admin_page
    def dashboard():
        with db_session:
            failing = Instance.select(lambda i: i.status in ("failed", "needs_attention")
                                      ).order_by(desc(Instance.id)).limit(20)
            recent = Instance.select().order_by(desc(Instance.id)).limit(10)
            queue_rows = Job.select(lambda j: j.state in ("queued", "running")
                                    ).order_by(Job.id).limit(50)
            return render("admin/dashboard.html", stats=admin.stats(config),
                          failing=[admin.instance_summary(config, i) for i in failing],
                          recent=[admin.instance_summary(config, i) for i in recent],
                          queue=[admin.job_summary(j) for j in queue_rows], refresh=10)

    @app.get("/admin/instances/")
    @admin_page
    def instances_page():
        status = request.query.get("status") or None
        if status not in STATUSES:
            status = None
        q = request.query.get("q") or None
        with db_session:
            return render("admin/instances.html", statuses=STATUSES, status=status, q=q,
                          page=admin.list_instances(config, status=status, q=q, per_page=200))

    @app.get("/admin/instances/<instance_id:int>/")
    @admin_page
    def instance_page(instance_id):
        with db_session:
            detail = or_404(admin.instance_detail, config, instance_id, page=True)
            busy = any(j["state"] in ("queued", "running") for j in detail["jobs"])
            health = admin.live_health(config, admin.get_instance(instance_id)) \
                if detail["live"] and detail["provisioned_at"] else None
        return render("admin/instance.html", i=detail, health=health, csrf=csrf_token(),
                      flash=request.query.get("flash"), refresh=2 if busy else None)

    @app.get("/admin/runs/")
    @admin_page
    def runs_page():
        with db_session:
            return render("admin/runs.html", runs=admin.list_runs(), refresh=10)

    @app.post("/admin/instances/<instance_id:int>/<action:re:start|stop|restart|suspend|unsuspend>/")
    @admin_page
    def instance_action(instance_id, action):
        check_csrf()
        try:
            flash = f"{action} queued as job {or_404(queue, instance_id, action, page=True)}"
        except admin.Conflict as exc:
            flash = str(exc)
        redirect(f"/admin/instances/{instance_id}/?flash={quote(flash)}", 303)

    @app.get("/admin/customers/")
    @admin_page
    def customers_page():
        with db_session:
            return render("admin/customers.html", page=admin.list_customers(1, 200))

    @app.get("/admin/runs/<run_id:int>/")
    @admin_page
    def run_page(run_id):
        with db_session:
            run = or_404(admin.run_detail, config, run_id, page=True)
        return render("admin/run.html", run=run, refresh=2 if run["status"] == "running" else None)

    def json_error(error) -> str:
        response.content_type = "application/json"
        return json.dumps({"error": error.body if isinstance(error.body, str) else "error"})

    for status_code in (400, 404, 405, 413, 500):
        app.error(status_code)(json_error)

    return app
