"""What every route group shares: JSON answers, request parsing, pages, headers,
and the checks that keep other sites from acting with an admin's credentials."""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from bottle import HTTPResponse, request, response
from jinja2 import Environment, PackageLoader, select_autoescape
from pony.orm import db_session

from provisioner import admin, metrics
from provisioner.config import Config
from provisioner.web.auth import Throttle, admin_required, deny, rate_limited

# Pages: only our own inline code, carrying this response's nonce; JSON: nothing at all.
PAGE_CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
_PAGES = Environment(loader=PackageLoader("provisioner", "templates"),
                     autoescape=select_autoescape(["html"]))


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


def json_body() -> dict:
    try:
        body = json.loads(request.body.read() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise json_response(400, {"error": "body must be JSON"}) from None
    if not isinstance(body, dict):
        raise json_response(400, {"error": "body must be a JSON object"})
    return body


def page_args() -> tuple[int, int]:
    try:
        page = int(request.query.get("page") or 1)
        per_page = int(request.query.get("per_page") or 50)
    except ValueError:
        raise json_response(400, {"error": "page and per_page must be integers"}) from None
    if page < 1 or not 1 <= per_page <= 200:
        raise json_response(400, {"error": "page >= 1 and 1 <= per_page <= 200"})
    return page, per_page


def render(template: str, **context) -> str:
    """A page, with a fresh CSP nonce for its inline style and script."""
    nonce = secrets.token_urlsafe(16)
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Cache-Control", "no-store")
    response.set_header("Content-Security-Policy", PAGE_CSP.format(nonce=nonce))
    return _PAGES.get_template(f"pages/{template}").render(nonce=nonce, **context)


def same_origin(origin: str | None, host: str | None, public_url: str) -> bool:
    """Is a browser's Origin (or Referer) this service, by the Host it asked or our URL?"""
    if not origin:
        return True  # not a browser's cross-site request: browsers send Origin on POSTs
    netloc = urlparse(origin).netloc
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

    def __post_init__(self) -> None:
        self.admin_api = admin_required(self.config, self.throttle)
        self.admin_page = admin_required(self.config, self.throttle, json_errors=False)

    def notify_worker(self) -> None:
        if self.wake is not None:
            self.wake.set()
        if self.on_event_recorded is not None:
            self.on_event_recorded()

    def queue_action(self, instance_id: int, action: str, *, page: bool = False) -> int:
        """Queue an admin action; its job id (404 if unknown; admin.Conflict if refused)."""
        with db_session:
            job_id = or_404(admin.queue_action, instance_id, action, page=page).id
        self.notify_worker()
        return job_id

    def csrf_token(self) -> str:
        return hmac.new(self.csrf_key, self.config.admin_user.encode(), "sha256").hexdigest()

    def check_csrf(self) -> None:
        token = request.forms.get("csrf", "")
        if not hmac.compare_digest(token, self.csrf_token()):
            raise HTTPResponse(status=403, body="bad or missing CSRF token")
        origin = request.get_header("Origin") or request.get_header("Referer")
        if not same_origin(origin, request.get_header("Host"), self.config.public_url):
            raise HTTPResponse(status=403, body="cross-site request refused")

    def check_api_post(self) -> None:
        """State-changing API calls: JSON only and never from another site's page.

        A cross-site form can send neither a JSON content type nor our Origin, and
        a browser would resend cached Basic credentials with it."""
        if request.content_type.split(";")[0].strip().lower() != "application/json":
            raise deny(415, "send the request as Content-Type: application/json", True)
        if not same_origin(request.get_header("Origin"), request.get_header("Host"),
                           self.config.public_url):
            raise deny(403, "cross-site request refused", True)

    def bind(self, route: Route) -> Callable:
        """The Bottle callback for a route: its function with this app's parts and checks."""

        def callback(**url_args):
            return route.handler(self, **url_args, **route.fixed)

        callback.__name__ = route.handler.__name__
        if route.per_minute:
            limit = getattr(self.config, f"{route.per_minute}_per_minute")
            callback = rate_limited(self.config, limit)(callback)
        if route.auth == "api":
            callback = self.admin_api(callback)
        elif route.auth == "page":
            callback = self.admin_page(callback)
        return callback
