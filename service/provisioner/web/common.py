"""What every route group shares: JSON answers, request parsing, pages, headers,
and the checks that keep other sites from acting with an admin's credentials."""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from urllib.parse import quote, urlparse

from bottle import HTTPResponse, redirect, request, response
from jinja2 import Environment, PackageLoader, select_autoescape
from pony.orm import db_session

from provisioner import admin, metrics
from provisioner.config import Config
from provisioner.models import database_busy
from provisioner.web.auth import (
    Throttle,
    WriteQuota,
    admin_required,
    client_address,
    deny,
    header,
    rate_limited,
    same_text,
)

log = logging.getLogger(__name__)

# Pages: only our own inline code, carrying this response's nonce; JSON: nothing at all.
PAGE_CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
_PAGES = Environment(loader=PackageLoader("provisioner", "templates"),
                     autoescape=select_autoescape(["html"]))

# The largest body any route takes (a Stripe event is tens of KB; the server refuses more).
MAX_BODY_BYTES = 512 * 1024
# Ids are Pony `int` keys (32-bit): a larger one names nothing and must not reach a query.
MAX_ID = 2**31 - 1
MAX_PAGE = 1_000_000
MAX_PER_PAGE = 200
# What SQLite says when another writer held the database past the busy timeout.
FORM_TYPE = "application/x-www-form-urlencoded"
REJECTED_ROWS_PER_ADDRESS = 10
REJECTED_ROWS_IN_TOTAL = 120


def security_headers(csp: str) -> dict[str, str]:
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
            "Cross-Origin-Opener-Policy": "same-origin"}


def add_security_headers() -> None:
    """after_request hook: headers a route did not set itself."""
    for name, value in security_headers(API_CSP).items():
        if name not in response.headers:
            response.set_header(name, value)


def json_response(status: int, body: dict) -> HTTPResponse:
    return HTTPResponse(status=status, body=json.dumps(body),
                        headers={"Content-Type": "application/json", "Cache-Control": "no-store"})


def request_body() -> bytes:
    """The request's body, at most MAX_BODY_BYTES (413 beyond: nothing of it is kept)."""
    if request.content_length > MAX_BODY_BYTES:
        raise too_large()
    body = request.body.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise too_large()
    return body


def too_large() -> HTTPResponse:
    return json_response(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})


def json_body() -> dict:
    """The body as a JSON object of text a database and an email can hold (400 if not)."""
    try:
        body = json.loads(request_body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise json_response(400, {"error": "body must be JSON"}) from None
    except ValueError:  # an integer past Python's digit limit
        raise json_response(400, {"error": "body must be JSON: a number is too long"}) from None
    except RecursionError:
        raise json_response(400, {"error": "body must be JSON: nested too deeply"}) from None
    if not isinstance(body, dict):
        raise json_response(400, {"error": "body must be a JSON object"})
    if not _encodable(body):
        raise json_response(400, {"error": "body must be JSON of valid Unicode text "
                                           "(no lone surrogate escapes)"})
    return body


def _encodable(value) -> bool:
    """No lone surrogate (a JSON escape like \\ud800) anywhere: UTF-8 cannot hold one."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def query_int(name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter in [low, high] (400 with the range if not)."""
    text = request.query.get(name) or ""
    if not text:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and low <= int(text) <= high):
        raise json_response(400, {"error": f"{name} must be from {low} to {high} "
                                           "(integers only)"})
    return int(text)


def page_args() -> tuple[int, int]:
    return (query_int("page", 1, 1, MAX_PAGE),
            query_int("per_page", 50, 1, MAX_PER_PAGE))


def render(template: str, **context) -> str:
    """A page, with a fresh CSP nonce for its inline style and script."""
    nonce = secrets.token_urlsafe(16)
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Cache-Control", "no-store")
    response.set_header("Content-Security-Policy", PAGE_CSP.format(nonce=nonce))
    return _PAGES.get_template(f"pages/{template}").render(nonce=nonce, **context)


_ACCOUNT_LINK = re.compile(r"^/account/[^/]+")


def logged_path() -> str:
    """The request's path for a log line: a customer's account link is a credential."""
    return _ACCOUNT_LINK.sub("/account/<link>", request.path)


def page_response(status: int, body: str, **headers: str) -> HTTPResponse:
    """An error page as an answer, with the headers render() gave it (no-store, CSP)."""
    return HTTPResponse(status=status, body=body,
                        headers={**dict(response.headers), **headers})


def same_origin(origin: str | None, host: str | None, public_url: str) -> bool:
    """Is a browser's Origin (or Referer) this service, by the Host it asked or our URL?"""
    if not origin:
        return True  # not a browser's cross-site request: browsers send Origin on POSTs
    try:
        netloc = urlparse(origin).netloc
    except ValueError:  # e.g. an unclosed IPv6 bracket: no origin of ours
        return False
    return bool(netloc) and netloc in {host, urlparse(public_url).netloc}


def or_404(lookup: Callable, *args, page: bool = False):
    """Call an admin lookup; an unknown id answers 404 (JSON for the API, text for pages)."""
    try:
        return lookup(*args)
    except admin.NotFound as exc:
        raise (HTTPResponse(status=404, body=str(exc)) if page
               else json_response(404, {"error": str(exc)})) from None


@dataclass(frozen=True)
class Route:
    """One route: a plain function of (web, url args); who may call it, how often."""

    method: str
    path: str
    handler: Callable
    auth: str | None = None  # None (public), "api" (JSON errors) or "page"
    per_minute: str | None = None  # a Config *_per_minute setting's prefix
    fixed: dict = field(default_factory=dict)  # arguments the path itself implies


@dataclass
class Web:
    """The app's shared parts, handed to each route group."""

    config: Config
    wake: threading.Event | None = None
    on_event_recorded: Callable[[], None] | None = None
    throttle: Throttle = field(default_factory=Throttle)
    webhook_metrics: metrics.WebhookMetrics = field(default_factory=metrics.WebhookMetrics)
    csrf_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # Rejected webhooks written down per minute: enough to see what is wrong, too few to
    # fill a disk; the rest are only counted (provisioner_webhooks_total).
    rejected_deliveries: WriteQuota = field(
        default_factory=lambda: WriteQuota(REJECTED_ROWS_PER_ADDRESS, REJECTED_ROWS_IN_TOTAL))

    def __post_init__(self) -> None:
        self.admin_api = admin_required(self.config, self.throttle)
        self.admin_page = admin_required(self.config, self.throttle, json_errors=False)

    def notify_worker(self) -> None:
        if self.wake is not None:
            self.wake.set()
        if self.on_event_recorded is not None:
            self.on_event_recorded()

    def queue_action(self, instance_id: int, action: str, *, page: bool = False) -> int:
        """Queue an admin action, audited; its job id (404 if unknown; admin.Conflict if
        refused)."""
        with db_session:
            job_id = or_404(admin.queue_action, instance_id, action, self.actor(),
                            page=page).id
        self.notify_worker()
        return job_id

    def actor(self) -> admin.Actor:
        """Who is acting, for the audit log (the route has checked the credentials): the
        admin user for Basic auth, "token" for the bearer token; from which address."""
        scheme = header("Authorization").partition(" ")[0].lower()
        return admin.Actor("token" if scheme == "bearer" else self.config.admin_user,
                           client_address(self.config))

    def csrf_token(self) -> str:
        return hmac.new(self.csrf_key, self.config.admin_user.encode(), "sha256").hexdigest()

    def check_csrf(self) -> None:
        """Page POSTs: our own forms only (URL-encoded, with this app's token, same origin)."""
        if request.content_type.split(";")[0].strip().lower() != FORM_TYPE:
            raise HTTPResponse(status=415, body=f"send the form as {FORM_TYPE}")
        if not same_text(request.forms.get("csrf", ""), self.csrf_token()):
            raise HTTPResponse(status=403, body="bad or missing CSRF token")
        origin = header("Origin") or header("Referer")
        if not same_origin(origin, header("Host"), self.config.public_url):
            raise HTTPResponse(status=403, body="cross-site request refused")

    def check_api_post(self) -> None:
        """State-changing API calls: JSON only and never from another site's page.

        A cross-site form can send neither a JSON content type nor our Origin, and
        a browser would resend cached Basic credentials with it."""
        if request.content_type.split(";")[0].strip().lower() != "application/json":
            raise deny(415, "send the request as Content-Type: application/json", True)
        if not same_origin(header("Origin"), header("Host"),
                           self.config.public_url):
            raise deny(403, "cross-site request refused", True)

    def bind(self, route: Route) -> Callable:
        """The Bottle callback for a route: its function with this app's parts and checks,
        ids checked before any lookup, and no exception left to answer for itself."""
        as_json = route.auth != "page"

        def callback(**url_args):
            check_ids(url_args, as_json)
            return route.handler(self, **url_args, **route.fixed)

        callback.__name__ = route.handler.__name__
        if route.per_minute:
            limit = getattr(self.config, f"{route.per_minute}_per_minute")
            callback = rate_limited(self.config, limit)(callback)
        if route.auth == "api":
            callback = self.admin_api(callback)
        elif route.auth == "page":
            callback = self.admin_page(callback)
        return self.answering_failures(callback, as_json)

    def answering_failures(self, callback: Callable, as_json: bool) -> Callable:
        """The one catch-all: a busy database is a 503 to retry, anything else unexpected a
        logged 500 that says nothing of the code."""

        @wraps(callback)
        def answered(**url_args):
            try:
                return callback(**url_args)
            except HTTPResponse:
                raise  # an answer (Bottle's redirects and errors are exceptions too)
            except Exception as exc:
                if database_busy(exc):
                    log.warning("%s %s: database busy", request.method, logged_path())
                    return busy_response(self.config, as_json)
                log.exception("unexpected error answering %s %s", request.method,
                              logged_path())
                return deny(500, "internal error (logged)", as_json)

        return answered


def check_ids(url_args: dict, as_json: bool) -> None:
    """Ids in the path beyond what the database can hold name nothing: 404, not a crash."""
    for name, value in url_args.items():
        if isinstance(value, int) and not 1 <= value <= MAX_ID:
            raise deny(404, f"no such {name.removesuffix('_id')}: ids are whole numbers "
                            f"from 1 to {MAX_ID}", as_json)


def busy_response(config: Config, as_json: bool = True) -> HTTPResponse:
    """503 with when to come back: nothing was done, the same request can simply be sent
    again (Stripe does so for webhooks)."""
    return deny(503, "database busy; nothing was changed, try again shortly", as_json,
                {"Retry-After": str(config.db_busy_timeout_seconds), "Cache-Control": "no-store"})


# -- store care requests (backups, restore, clone, move) -------------------------------

def queued(web: Web, work) -> object:
    """Run an admin request: 202 with its job, 409 with why it was refused."""
    try:
        with db_session:
            result = work()
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    web.notify_worker()
    return json_response(202, {**result, "status_url": f"/api/jobs/{result['job_id']}/"})


def text_field(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return None if value is None else str(value)
    if not isinstance(value, str) or len(value) > 500:
        raise json_response(400, {"error": f"{name} must be a number or text of at most "
                                           "500 characters"})
    return value


def page_request(web: Web, instance_id: int, work, said) -> None:
    """A store page's form: the work done once the form's CSRF token is accepted, then
    back to the store's page saying what was queued or why not."""
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
