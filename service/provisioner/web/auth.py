"""Admin authentication and the per-client limits of the web service.

Credentials are HTTP Basic or a bearer token, compared in constant time.
Failed attempts are counted per (client address, user name), so guessing from
one address cannot lock the admin out from another, plus a ceiling per
address that bounds guessing across user names. The client address is the
socket's, unless the socket is a configured trusted proxy: only then is
X-Forwarded-For believed.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import wraps

from bottle import HTTPResponse, request

from provisioner.config import Config

MAX_FAILURES = 5
MAX_FAILURES_PER_ADDRESS = 20
WINDOW_SECONDS = 300
MAX_KEYS = 10_000


class SlidingWindow:
    """Counts events per key; past `limit` in `window` seconds, the key waits.

    Keys are kept in the order they were last used, so expired ones go from the
    front in O(1), and at most `max_keys` are kept (the stalest are forgotten):
    many one-off keys cost neither memory nor time."""

    def __init__(self, limit: int, window: float, max_keys: int = MAX_KEYS):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._events:
            key, stamps = next(iter(self._events.items()))
            if stamps and now - stamps[-1] < self.window and len(self._events) <= self.max_keys:
                return
            del self._events[key]

    def _recent(self, key: str, now: float) -> deque[float]:
        stamps = self._events.get(key) or deque(maxlen=self.limit)
        while stamps and now - stamps[0] >= self.window:
            stamps.popleft()
        if not stamps:
            self._events.pop(key, None)  # nothing recent: the key is forgotten
        return stamps

    def retry_after(self, key: str) -> int:
        """Seconds until `key` may act again; 0 if it may now."""
        with self._lock:
            now = time.monotonic()
            stamps = self._recent(key, now)
            if len(stamps) < self.limit:
                return 0
            return max(1, int(self.window - (now - stamps[0])) + 1)

    def add(self, key: str) -> None:
        with self._lock:
            now = time.monotonic()
            stamps = self._recent(key, now)
            stamps.append(now)
            self._events[key] = stamps
            self._events.move_to_end(key)
            self._expire(now)

    def clear(self, key: str) -> None:
        with self._lock:
            self._events.pop(key, None)

    def take(self, key: str) -> int:
        """Count one event if allowed now; otherwise the seconds to wait."""
        wait = self.retry_after(key)
        if not wait:
            self.add(key)
        return wait


class WriteQuota:
    """How many rows an untrusted caller may make us write: at most `per_address` a
    minute from one client and `in_total` a minute from all (the caller only counts the
    rest), so a flood cannot fill the disk."""

    def __init__(self, per_address: int, in_total: int):
        self.per_address = SlidingWindow(per_address, 60)
        self.in_total = SlidingWindow(in_total, 60)

    def take(self, address: str) -> bool:
        """May this client's row be written now? (Counts it if so.)"""
        return not self.per_address.take(address) and not self.in_total.take("*")


class Throttle:
    """Failed logins per (address, user) and per address."""

    def __init__(self, max_failures: int = MAX_FAILURES,
                 max_per_address: int = MAX_FAILURES_PER_ADDRESS,
                 window: float = WINDOW_SECONDS):
        self.per_user = SlidingWindow(max_failures, window)
        self.per_address = SlidingWindow(max_per_address, window)

    def retry_after(self, address: str, user: str) -> int:
        return max(self.per_user.retry_after(f"{address}|{user}"),
                   self.per_address.retry_after(address))

    def failed(self, address: str, user: str) -> None:
        self.per_user.add(f"{address}|{user}")
        self.per_address.add(address)

    def succeeded(self, address: str, user: str) -> None:
        self.per_user.clear(f"{address}|{user}")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, IPv4-mapped IPv6 (a dual-stack socket's view of IPv4) as IPv4."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip, proxies: tuple[str, ...]) -> bool:
    return ip is not None and any(ip in ipaddress.ip_network(net) for net in proxies)


def _client_key(ip, fallback: str) -> str:
    """What limits count per: an IPv4 address, or the /64 an IPv6 address is in (one
    subscriber usually holds a whole /64, so single addresses are free to them)."""
    if ip is None:
        return fallback
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address(config: Config, environ: dict | None = None) -> str:
    """The client, as limits count it: the socket's peer or, when the peer is a trusted
    proxy, the nearest untrusted X-Forwarded-For hop."""
    environ = request.environ if environ is None else environ
    raw_peer = environ.get("REMOTE_ADDR") or "?"
    peer = _address(raw_peer)
    if not config.trusted_proxies or not _trusted(peer, config.trusted_proxies):
        return _client_key(peer, raw_peer)
    hops = [h for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    for hop in reversed(hops):
        ip = _address(hop)
        if not _trusted(ip, config.trusted_proxies):
            return _client_key(ip, hop.strip()[:64])
    return _client_key(peer, raw_peer)


def header(name: str, default: str = "") -> str:
    """A request header as the server handed it (PEP 3333's Latin-1 text). Bottle's own
    `get_header` decodes it again as UTF-8 and raises on other bytes."""
    return request.environ.get("HTTP_" + name.upper().replace("-", "_"), default)


def same_text(a: str, b: str) -> bool:
    """Constant-time equality of any two texts (a header's Latin-1 or a form's lone
    surrogate is simply unequal, never an error)."""
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def claimed_user(authorization: str) -> str:
    """Who the Authorization header says it is (for throttling, not trust)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return "(token)"
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip()).decode("utf-8").partition(":")[0][:100]
        except (ValueError, UnicodeDecodeError):
            return "(malformed)"
    return "(none)"


def credentials_ok(config: Config, authorization: str) -> bool:
    """Does this Authorization header name the admin?"""
    if not config.admin_password and not config.admin_token:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and config.admin_token:
        return same_text(value.strip(), config.admin_token)
    if scheme.lower() == "basic" and config.admin_password:
        try:
            user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        # Both compared, always, so timing says nothing about which was wrong.
        return same_text(user, config.admin_user) & same_text(password, config.admin_password)
    return False


def admin_required(config: Config, throttle: Throttle, *, json_errors: bool = True) -> Callable:
    """Decorator for admin routes: 401 without valid credentials, 429 when throttled."""

    def decorator(route: Callable) -> Callable:
        @wraps(route)
        def wrapper(*args, **kwargs):
            authorization = header("Authorization")
            client, user = client_address(config), claimed_user(authorization)
            wait = throttle.retry_after(client, user)
            if wait:
                return deny(429, "too many failed logins; try again later", json_errors,
                            {"Retry-After": str(wait)})
            if not credentials_ok(config, authorization):
                throttle.failed(client, user)
                return deny(401, "admin credentials required", json_errors,
                            {"WWW-Authenticate": 'Basic realm="eBuilder provisioner"'})
            throttle.succeeded(client, user)
            return route(*args, **kwargs)

        return wrapper

    return decorator


def rate_limited(config: Config, limit_per_minute: int) -> Callable:
    """Decorator for public POST routes: at most `limit_per_minute` per client address."""
    window = SlidingWindow(limit_per_minute, 60)

    def decorator(route: Callable) -> Callable:
        @wraps(route)
        def wrapper(*args, **kwargs):
            wait = window.take(client_address(config))
            if wait:
                return deny(429, "too many requests; try again later", True,
                            {"Retry-After": str(wait)})
            return route(*args, **kwargs)

        return wrapper

    return decorator


def deny(status: int, reason: str, as_json: bool, headers: dict | None = None) -> HTTPResponse:
    body = json.dumps({"error": reason}) if as_json else reason
    content_type = "application/json" if as_json else "text/plain; charset=utf-8"
    return HTTPResponse(status=status, body=body,
                        headers={**(headers or {}), "Content-Type": content_type})
