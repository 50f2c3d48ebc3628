"""The HTTP service: thin routes over the plain functions of the other modules."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from bottle import Bottle, HTTPResponse, request, response
from pony.orm import db_session

from provisioner import intake, subdomains
from provisioner.checkout import (
    CheckoutUnavailable,
    create_checkout_session,
    validate_email,
    validate_site_name,
)
from provisioner.config import Config
from provisioner.events import hold_subdomain

log = logging.getLogger(__name__)


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


def create_app(config: Config, wake: threading.Event | None = None,
               on_event_recorded: Callable[[], None] | None = None) -> Bottle:
    """Build the app for this config; `wake` is set when new work is queued."""
    app = Bottle()
    app.config["provisioner.config"] = config

    def notify_worker() -> None:
        if wake is not None:
            wake.set()
        if on_event_recorded is not None:
            on_event_recorded()

    @app.post("/api/webhook/stripe/")
    def stripe_webhook():
        started = time.perf_counter()
        payload = request.body.read()
        try:
            event = intake.verify(payload, request.get_header("Stripe-Signature"),
                                  config.stripe_webhook_secret, config.stripe_webhook_tolerance)
        except intake.RejectedEvent as exc:
            log.warning("rejected webhook: %s", exc)
            return json_response(400, {"error": str(exc)})
        recorded = intake.record(event, payload)
        if not recorded.duplicate:
            notify_worker()
        log.info("webhook %s %s%s in %.1f ms", recorded.type, recorded.stripe_id,
                 " (duplicate)" if recorded.duplicate else "",
                 (time.perf_counter() - started) * 1000)
        return json_response(200, {"received": True, "duplicate": recorded.duplicate})

    @app.post("/api/check-subdomain/")
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

    def json_error(error) -> str:
        response.content_type = "application/json"
        return json.dumps({"error": error.body if isinstance(error.body, str) else "error"})

    for status in (400, 404, 405, 413, 500):
        app.error(status)(json_error)

    return app
