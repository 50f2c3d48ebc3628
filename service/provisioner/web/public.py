"""Routes for everyone: Stripe's webhook, the signup page and its API, the status page."""

from __future__ import annotations

import logging
import time

from pony.orm import db_session
from pony.orm.core import OrmError
from pony.orm.dbapiprovider import DBException

from provisioner import admin, intake, models, plans, subdomains, uptime
from provisioner.checkout import (
    CheckoutUnavailable,
    create_checkout_session,
    validate_email,
    validate_site_name,
)
from provisioner.web.auth import client_address, header
from provisioner.web.common import (
    Route,
    Web,
    busy_response,
    database_busy,
    json_body,
    json_response,
    render,
    request_body,
)
from provisioner.web.openapi import document as openapi_document

log = logging.getLogger(__name__)


def stripe_webhook(web: Web):
    """Verify, record, acknowledge; every delivery written down (a flood of rejections
    only up to its quota), a busy database answered 503 so Stripe sends it again."""
    started = time.perf_counter()
    address = client_address(web.config)
    payload = request_body()
    try:
        event = intake.verify(payload, header("Stripe-Signature"),
                              web.config.stripe_webhook_secret,
                              web.config.stripe_webhook_tolerance)
    except intake.RejectedEvent as exc:
        return _rejected(web, str(exc), address, started)
    try:
        recorded = intake.record(event, payload, address)
    except (OrmError, DBException) as exc:
        if not database_busy(exc):
            raise
        web.webhook_metrics.observe("busy", time.perf_counter() - started)
        log.warning("webhook %s %s not recorded: database busy; answered 503 for a retry",
                    event["type"], event["id"])
        return busy_response(web.config)
    if not recorded.duplicate:
        web.notify_worker()
    elapsed = time.perf_counter() - started
    web.webhook_metrics.observe("duplicate" if recorded.duplicate else "recorded", elapsed)
    log.info("webhook %s %s%s in %.1f ms", recorded.type, recorded.stripe_id,
             " (duplicate)" if recorded.duplicate else "", elapsed * 1000)
    return json_response(200, {"received": True, "duplicate": recorded.duplicate})


def _rejected(web: Web, reason: str, address: str, started: float):
    """400 with the reason; a row and a log line only within the quota, so a flood can
    fill neither the database nor the log."""
    if web.rejected_deliveries.take(address):
        log.warning("rejected webhook from %s: %s", address, reason)
        try:
            intake.record_rejection(reason, address)
        except (OrmError, DBException) as exc:
            if not database_busy(exc):
                raise
            log.warning("rejected webhook from %s not written down: database busy", address)
        result = "rejected"
    else:
        result = "rejected_unrecorded"
    web.webhook_metrics.observe(result, time.perf_counter() - started)
    return json_response(400, {"error": reason})


def check_subdomain(web: Web):
    body = json_body()
    try:
        with db_session:
            name = subdomains.check_available(body.get("subdomain"))
    except subdomains.SubdomainTaken as exc:
        return json_response(200, {"available": False, "reason": str(exc)})
    except subdomains.InvalidSubdomain as exc:
        return json_response(400, {"available": False, "error": str(exc)})
    return json_response(200, {"available": True, "subdomain": name,
                               "url": web.config.store_url(name)})


def create_checkout(web: Web):
    body = json_body()
    try:
        site_name = validate_site_name(body.get("site_name"))
        email = validate_email(body.get("email"))
        plan = plans.by_key(web.config, body.get("plan"))
        with db_session:
            name = subdomains.check_available(body.get("subdomain"), email=email)
    except subdomains.SubdomainTaken as exc:
        return json_response(409, {"error": str(exc)})
    except ValueError as exc:
        return json_response(400, {"error": str(exc)})
    try:
        session = create_checkout_session(web.config, name, site_name, email, plan)
    except CheckoutUnavailable as exc:
        return json_response(503, {"error": str(exc)})
    with db_session:
        subdomains.hold(name, session["id"], email, session.get("expires_at"))
    return json_response(200, {"session_id": session["id"], "checkout_url": session["url"]})


def service_health(web: Web):
    problem = models.database_problem()
    if problem is not None:
        return json_response(503, {"status": "failing", "error": problem})
    return json_response(200, {"status": "ok"})


def status_json(web: Web):
    with db_session:
        return json_response(200, admin.public_status())


def openapi(web: Web):
    return json_response(200, openapi_document())


def signup_page(web: Web):
    return render("signup.html", base_domain=web.config.base_domain,
                  plans=plans.all_plans(web.config),
                  delete_after_days=web.config.delete_after_days)


def signup_success(web: Web):
    return render("signup_done.html", heading="Thank you!",
                  text="Your payment went through. Your store is being built now; "
                       "you will get an email with its address and your login in a minute.")


def signup_cancelled(web: Web):
    return render("signup_done.html", heading="Checkout cancelled",
                  text="Nothing was charged. You can start again whenever you like.")


def status_page(web: Web):
    """The service's state, and the uptime of the stores an admin made public."""
    with db_session:
        return render("status.html", status=admin.public_status(),
                      uptime=uptime.public_rows(
                          interval_minutes=web.config.health_interval_minutes),
                      refresh=30)


ROUTES = (
    Route("POST", "/api/webhook/stripe/", stripe_webhook),
    Route("POST", "/api/check-subdomain/", check_subdomain, per_minute="check_subdomain"),
    Route("POST", "/api/create-checkout/", create_checkout, per_minute="checkout"),
    Route("GET", "/api/health/", service_health),
    Route("GET", "/api/status/", status_json),
    Route("GET", "/api/openapi.json", openapi),
    Route("GET", "/", signup_page),
    Route("GET", "/signup/", signup_page),
    Route("GET", "/signup/success/", signup_success),
    Route("GET", "/signup/cancelled/", signup_cancelled),
    Route("GET", "/status/", status_page),
)
