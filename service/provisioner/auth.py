"""Admin authentication: HTTP Basic or a bearer token, compared in constant time,
with failed attempts throttled per client address."""

from __future__ import annotations

import base64
import hmac
import threading
import time
from collections.abc import Callable
from functools import wraps

from bottle import HTTPResponse, request

from provisioner.config import Config

MAX_FAILURES = 5
WINDOW_SECONDS = 300


class Throttle:
    """Counts failures per client; past MAX_FAILURES in WINDOW_SECONDS, the client waits."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW_SECONDS):
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        stamps = [t for t in self._failures.get(client, []) if now - t < self.window]
        self._failures[client] = stamps
        return stamps

    def retry_after(self, client: str) -> int:
        with self._lock:
            now = time.monotonic()
            stamps = self._recent(client, now)
            if len(stamps) < self.max_failures:
                return 0
            return max(1, int(self.window - (now - stamps[0])))

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client, time.monotonic()).append(time.monotonic())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def credentials_ok(config: Config, header: str) -> bool:
    """Does this Authorization header name the admin?"""
    if not config.admin_password and not config.admin_token:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and config.admin_token:
        return _same(value.strip(), config.admin_token)
    if scheme.lower() == "basic" and config.admin_password:
        try:
            user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        # Both compared, always, so timing says nothing about which was wrong.
        return _same(user, config.admin_user) & _same(password, config.admin_password)
    return False


def admin_required(config: Config, throttle: Throttle, *, json_errors: bool = True) -> Callable:
    """Decorator for admin routes: 401 without valid credentials, 429 when throttled."""

    def decorator(route: Callable) -> Callable:
        @wraps(route)
        def wrapper(*args, **kwargs):
            client = request.remote_addr or "?"
            wait = throttle.retry_after(client)
            if wait:
                return _deny(429, "too many failed logins; try again later", json_errors,
                             {"Retry-After": str(wait)})
            if not credentials_ok(config, request.get_header("Authorization", "")):
                throttle.failed(client)
                return _deny(401, "admin credentials required", json_errors,
                             {"WWW-Authenticate": 'Basic realm="eBuilder provisioner"'})
            throttle.succeeded(client)
            return route(*args, **kwargs)

        return wrapper

    return decorator


def _deny(status: int, reason: str, as_json: bool, headers: dict) -> HTTPResponse:
    import json

    body = json.dumps({"error": reason}) if as_json else reason
    content_type = "application/json" if as_json else "text/plain; charset=utf-8"
    return HTTPResponse(status=status, body=body,
                        headers={**headers, "Content-Type": content_type})
