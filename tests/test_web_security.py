"""The web service against an attacker: cross-site use of the admin API, framing and
script injection on pages, login throttling on the real peer, public POST limits."""

from __future__ import annotations

import dataclasses
import re

import pytest
from pony.orm import db_session

from provisioner.models import Instance, Job
from provisioner.testing import stripe_events
from provisioner.web import create_app
from provisioner.web.auth import client_address
from tests.conftest import apply_events
from tests.wsgi import basic, call

PASSWORD = "admin-pass-456"
AUTH = basic("admin", PASSWORD)


@pytest.fixture
def admin_config(config):
    return dataclasses.replace(config, admin_password=PASSWORD, admin_token="t" * 24)


@pytest.fixture
def app(admin_config):
    return create_app(admin_config)


@pytest.fixture
def store_id(admin_config):
    apply_events(admin_config, stripe_events.signup(subdomain="safe-shop", site_name="Safe",
                                                    email="owner@example.com"))
    with db_session:
        instance = Instance.get(subdomain="safe-shop")
        instance.provisioned_at = instance.created_at
        Job.select().delete(bulk=True)
        return instance.id


def _action_jobs() -> int:
    with db_session:
        return Job.select(lambda j: j.kind == "action").count()


def test_a_cross_site_form_cannot_stop_a_store(app, store_id):
    """What a foreign page can make a browser send, with the admin's cached Basic auth."""
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded",
            "Origin": "https://evil.example"}
    status, body = call(app, "POST", f"/api/instances/{store_id}/stop/", body=b"x=1",
                        headers=form)
    assert status == 415 and "application/json" in body["error"]
    status, body = call(app, "POST", f"/api/instances/{store_id}/stop/", body=b"",
                        headers={**form, "Content-Type": "text/plain"})
    assert status == 415
    # Even JSON (which needs a CORS preflight nobody answers) from another origin.
    status, body = call(app, "POST", f"/api/instances/{store_id}/stop/", body={},
                        headers={**AUTH, "Origin": "https://evil.example"})
    assert status == 403 and "cross-site" in body["error"]
    assert _action_jobs() == 0
    # Scripts (no Origin) and our own pages (same origin) still work.
    assert call(app, "POST", f"/api/instances/{store_id}/stop/", body={}, headers=AUTH)[0] == 202
    status, _ = call(app, "POST", f"/api/instances/{store_id}/restart/", body={},
                     headers={**AUTH, "Origin": "http://test"})
    assert status in (202, 409)


@pytest.mark.parametrize("path, needs_auth", [("/", False), ("/status/", False),
                                              ("/admin/", True), ("/admin/instances/", True)])
def test_pages_forbid_framing_and_foreign_scripts(app, path, needs_auth):
    status, html, headers = call(app, "GET", path, headers=AUTH if needs_auth else {}, raw=True)
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    # Every inline script and style carries this response's nonce; no inline style attributes.
    for tag in re.findall(rb"<(?:script|style)[^>]*>", html):
        assert f'nonce="{nonce}"'.encode() in tag, tag
    assert b" style=" not in html and b" onclick=" not in html
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["X-Content-Type-Options"] == "nosniff"
    # A new nonce each time.
    assert call(app, "GET", path, headers=AUTH if needs_auth else {},
                raw=True)[2]["Content-Security-Policy"] != csp


def test_json_answers_and_errors_carry_the_headers_too(app):
    for path, expected in (("/api/status/", 200), ("/api/instances/", 401), ("/nowhere", 404)):
        status, _, headers = call(app, "GET", path, raw=True)
        assert status == expected
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_forwarded_for_from_an_untrusted_peer_is_ignored(app):
    """300 guesses, each claiming another address: the 6th and later are refused."""
    statuses = [call(app, "GET", "/api/stats/",
                     headers={**basic("admin", f"guess{n}"),
                              "X-Forwarded-For": f"10.9.{n // 250}.{n % 250}"})[0]
                for n in range(300)]
    assert statuses.count(401) == 5 and statuses.count(429) == 295


def test_nobody_can_lock_the_admin_out_from_elsewhere(app):
    for _ in range(5):
        assert call(app, "GET", "/api/stats/", headers=basic("admin", "wrong"),
                    remote_addr="192.0.2.66")[0] == 401
    assert call(app, "GET", "/api/stats/", headers=AUTH, remote_addr="192.0.2.66")[0] == 429
    # The real admin, from their own address, is not affected.
    assert call(app, "GET", "/api/stats/", headers=AUTH, remote_addr="198.51.100.7")[0] == 200


def test_guessing_across_user_names_hits_the_per_address_ceiling(app):
    statuses = [call(app, "GET", "/api/stats/", headers=basic(f"user{n}", "x"),
                     remote_addr="192.0.2.77")[0] for n in range(40)]
    assert statuses.count(401) == 20 and statuses.count(429) == 20


def test_behind_a_trusted_proxy_the_forwarded_client_counts(admin_config):
    app = create_app(dataclasses.replace(admin_config, trusted_proxies=("127.0.0.0/8",)))
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    for _ in range(5):
        call(app, "GET", "/api/stats/", headers={**basic("admin", "bad"), **attacker})
    assert call(app, "GET", "/api/stats/", headers={**AUTH, **attacker})[0] == 429
    assert call(app, "GET", "/api/stats/",
                headers={**AUTH, "X-Forwarded-For": "198.51.100.1"})[0] == 200


@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    ("203.0.113.5", "1.2.3.4", (), "203.0.113.5"),
    ("203.0.113.5", "1.2.3.4", ("10.0.0.0/8",), "203.0.113.5"),
    ("10.0.0.2", "1.2.3.4", ("10.0.0.0/8",), "1.2.3.4"),
    # The client may prepend anything; the hop our proxy saw is the rightmost untrusted one.
    ("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.3", ("10.0.0.0/8",), "1.2.3.4"),
    ("10.0.0.2", "", ("10.0.0.0/8",), "10.0.0.2"),
    # IPv6 clients count per /64 (one subscriber's whole network).
    ("::1", "2001:db8::5", ("::1/128",), "2001:db8::/64"),
    ("2001:db8:0:1::7", "", (), "2001:db8:0:1::/64"),
    # A dual-stack socket reports an IPv4 proxy as IPv4-mapped IPv6.
    ("::ffff:127.0.0.1", "203.0.113.4", ("127.0.0.1",), "203.0.113.4"),
    ("::ffff:198.51.100.2", "", (), "198.51.100.2"),
])
def test_client_address(config, peer, forwarded, trusted, expected):
    environ = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert client_address(dataclasses.replace(config, trusted_proxies=trusted), environ) \
        == expected


def test_public_posts_are_limited_per_address(config):
    app = create_app(dataclasses.replace(config, check_subdomain_per_minute=5,
                                         checkout_per_minute=2))
    statuses = [call(app, "POST", "/api/check-subdomain/", {"subdomain": "free-name"})[0]
                for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    status, _, headers = call(app, "POST", "/api/check-subdomain/", {"subdomain": "x1y"},
                              raw=True)
    assert status == 429 and int(headers["Retry-After"]) > 0
    assert call(app, "POST", "/api/check-subdomain/", {"subdomain": "free-name"},
                remote_addr="198.51.100.8")[0] == 200
    statuses = [call(app, "POST", "/api/create-checkout/", {"subdomain": "abc"})[0]
                for _ in range(3)]
    assert statuses == [400, 400, 429]


def test_many_addresses_in_one_ipv6_network_share_one_limit(app):
    statuses = [call(app, "GET", "/api/stats/", headers=basic("admin", "guess"),
                     remote_addr=f"2001:db8::{n:x}")[0] for n in range(1, 40)]
    assert statuses.count(401) == 5 and statuses.count(429) == 34


def test_the_throttle_forgets_the_stalest_keys_beyond_its_cap():
    from provisioner.web.auth import SlidingWindow

    window = SlidingWindow(limit=5, window=300, max_keys=1000)
    for n in range(5000):
        window.add(f"198.51.{n // 256}.{n % 256}")
    assert len(window._events) == 1000
    # The newest keys are the ones kept.
    assert "198.51.19.135" in window._events and "198.51.0.0" not in window._events
    for _ in range(5):
        window.add("203.0.113.1")
    assert window.retry_after("203.0.113.1") > 0


def test_a_key_whose_failures_expired_does_not_break_later_logins(monkeypatch):
    """A key emptied by expiry used to stay behind and crash the next count (500)."""
    from provisioner.web import auth

    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    window = auth.SlidingWindow(limit=5, window=300)
    window.add("198.51.100.1")
    clock[0] += 301
    assert window.retry_after("198.51.100.1") == 0
    window.add("198.51.100.2")  # expires the stale front key without an IndexError
    assert list(window._events) == ["198.51.100.2"]
