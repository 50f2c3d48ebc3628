"""Input the web service must refuse with a 4xx and a reason, never a 500: one test per
kind that once answered 500 (issue 14), plus the server's bounds on slow and large
requests, a busy database, and the record of every webhook delivery.

Most go through the WSGI app; framing, slow clients and body size through the real
cheroot server (`web/server.py`) on a loopback port.
"""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager

import pytest
from pony.orm import count, db_session, select

from provisioner import models
from provisioner.models import Instance, Job, StripeEvent, WebhookDelivery
from provisioner.testing import stripe_events
from provisioner.testing.stack import free_port
from provisioner.web import create_app, server
from provisioner.web.common import MAX_BODY_BYTES, MAX_ID
from tests import wsgi
from tests.conftest import WEBHOOK_SECRET, apply_events
from tests.wsgi import basic

PASSWORD = "admin-pass-789"
AUTH = basic("admin", PASSWORD)
WEBHOOK = "/api/webhook/stripe/"


@pytest.fixture
def admin_config(config):
    return dataclasses.replace(config, admin_password=PASSWORD)


@pytest.fixture
def app(admin_config):
    return create_app(admin_config)


def call(app, method, path, **kwargs):
    """tests.wsgi.call with the wsgi.errors stream a server provides (Bottle writes a
    crash's traceback there)."""
    def with_errors(environ, start_response):
        environ.setdefault("wsgi.errors", io.StringIO())
        return app(environ, start_response)

    return wsgi.call(with_errors, method, path, **kwargs)


def signed(body: bytes) -> dict:
    return {"Stripe-Signature": sign(body)}


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    import hashlib
    import hmac

    timestamp = int(time.time())
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def an_event() -> dict:
    return stripe_events.signup(subdomain="input-shop", site_name="In",
                                email="in@example.com")[0]


# -- bad or unsigned signatures, Latin-1 header bytes ------------------------------------

@pytest.mark.parametrize("header, reason", [
    ("t=1,v1=\u00e9\u00ff", "not ASCII"),  # Latin-1 bytes on the wire
    ("t=\u00ff", "not ASCII"),
    ("t=abc,v1=00", "bad signature"),
    (",,,", "bad signature"),
    ("", "missing Stripe-Signature"),
])
def test_a_bad_or_foreign_signature_is_400_with_a_reason(app, header, reason):
    body = stripe_events.encode(an_event())
    status, answer = call(app, "POST", WEBHOOK, body=body,
                          headers={"Stripe-Signature": header} if header else {})
    assert status == 400 and reason in answer["error"]
    with db_session:
        assert StripeEvent.select().count() == 0


@pytest.mark.parametrize("name, value, path, expected", [
    ("Authorization", "Basic \u00e9\u00ff\u00fe", "/api/stats/", 401),
    ("Authorization", "Bearer caf\u00e9", "/admin/", 401),
    ("Origin", "http://\u00e9\u00ff", "/api/instances/1/stop/", 403),
])
def test_latin1_header_bytes_are_refused_not_a_crash(app, name, value, path, expected):
    headers = {**AUTH, name: value} if name != "Authorization" else {name: value}
    status = call(app, "POST" if path.endswith("stop/") else "GET", path, body={},
                  headers=headers, raw=True)[0]
    assert status == expected


def test_an_unclosed_ipv6_origin_is_refused_as_cross_site(app, admin_config):
    apply_events(admin_config, stripe_events.signup(subdomain="origin-shop", site_name="O",
                                                    email="o@example.com"))
    with db_session:
        store = Instance.get(subdomain="origin-shop").id
    status, answer = call(app, "POST", f"/api/instances/{store}/stop/", body={},
                          headers={**AUTH, "Origin": "http://[::1"})
    assert status == 403 and "cross-site" in answer["error"]


# -- signed bodies that are not Stripe events -------------------------------------------

@pytest.mark.parametrize("body, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"id": "evt_1", "type": "a", "data": {"object": {}}, "x": ' + b"[" * 5000 + b"]" * 5000
     + b"}", "nested too deeply"),
    (b'{"id": "evt_1", "type": "a", "data": {"object": {}}, "n": ' + b"9" * 5000 + b"}",
     "too long"),
])
def test_signed_deep_or_huge_json_is_400(app, body, reason):
    status, answer = call(app, "POST", WEBHOOK, body=body, headers=signed(body))
    assert status == 400 and reason in answer["error"]


@pytest.mark.parametrize("event, reason", [
    ({"id": "evt_1", "type": "invoice.paid", "data": "x"}, "data.object"),
    ({"id": "evt_1", "type": "invoice.paid", "data": {"object": []}}, "data.object"),
    ({"id": "evt_\ud800", "type": "invoice.paid", "data": {"object": {}}}, "evt_ id"),
    ({"id": 7, "type": "invoice.paid", "data": {"object": {}}}, "evt_ id"),
    ({"id": "evt_" + "a" * 400, "type": "invoice.paid", "data": {"object": {}}}, "evt_ id"),
    ({"id": "evt_1", "type": "invoice paid", "data": {"object": {}}}, "type"),
    ({"id": "evt_1", "type": "x" * 500, "data": {"object": {}}}, "type"),
    ({"id": "evt_1", "type": "invoice.paid", "created": "soon", "data": {"object": {}}},
     "created"),
])
def test_signed_json_that_is_not_an_event_is_400(app, event, reason):
    body = json.dumps(event).encode()
    status, answer = call(app, "POST", WEBHOOK, body=body, headers=signed(body))
    assert status == 400 and reason in answer["error"]
    with db_session:
        assert StripeEvent.select().count() == 0


# -- the public JSON routes ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/check-subdomain/", "/api/create-checkout/"])
@pytest.mark.parametrize("body, reason", [
    (b'{"subdomain": ' + b"1" * 5000 + b"}", "too long"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"subdomain": "ok-shop", "site_name": "\\ud800", "email": "a@b.co"}', "surrogate"),
    (b'{"subdomain": "ok-shop", "site_name": "S", "email": "\\udfff@b.co"}', "surrogate"),
])
def test_public_json_routes_refuse_odd_bodies_with_400(app, path, body, reason):
    status, answer = call(app, "POST", path, body=body)
    assert status == 400 and reason in answer["error"]


def test_a_body_over_the_cap_is_413_and_not_read(app):
    body = b'{"subdomain": "' + b"a" * MAX_BODY_BYTES + b'"}'
    for path in ("/api/check-subdomain/", WEBHOOK):
        status, answer = call(app, "POST", path, body=body, headers=signed(body))
        assert status == 413 and str(MAX_BODY_BYTES) in answer["error"]


# -- ids and pages beyond what the database holds, on every route --------------------------

def id_routes(app) -> list[tuple[str, str]]:
    return [(route.method, route.rule) for route in app.routes if ":int>" in route.rule]


def test_every_route_with_an_id_answers_404_for_ids_beyond_the_database(app):
    routes = id_routes(app)
    assert len(routes) >= 8
    for method, rule in routes:
        for huge in (2**63, MAX_ID + 1, 10**30, 0):
            path = "/".join(str(huge) if ":int>" in part else part.split(":re:")[-1]
                            .strip("<>").split("|")[0] for part in rule.split("/"))
            status, body = call(app, method, path, body={}, headers=AUTH, raw=True)[:2]
            assert status == 404, (method, path, status, body)
            assert b"no such" in body and str(MAX_ID).encode() in body


@pytest.mark.parametrize("path", ["/api/instances/", "/api/customers/", "/api/webhooks/",
                                  "/api/audit/"])
@pytest.mark.parametrize("page", [str(2**63), str(2**64), "9" * 30, "\u0663", "1_0"])
def test_page_numbers_beyond_any_page_are_400_with_the_range(app, path, page):
    status, body = call(app, "GET", path, headers=AUTH, query=f"page={page}")
    assert status == 400 and "page must be from 1 to" in body["error"]


# -- a busy database -----------------------------------------------------------------------

@contextmanager
def database_held_by_another_writer(config):
    """Another process's write transaction, and a short wait for ours (so the test is
    quick; the service waits DB_BUSY_TIMEOUT_SECONDS)."""
    with db_session:
        models.db.execute("PRAGMA busy_timeout = 200")
    other = sqlite3.connect(str(config.database_path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.rollback()
        other.close()
        with db_session:
            models.db.execute(f"PRAGMA busy_timeout = {config.db_busy_timeout_seconds * 1000}")


def test_a_busy_database_answers_503_with_retry_after_and_loses_nothing(app, admin_config):
    apply_events(admin_config, stripe_events.signup(subdomain="busy-shop", site_name="B",
                                                    email="b@example.com"))
    with db_session:
        store = Instance.get(subdomain="busy-shop").id
        Job.select().delete(bulk=True)
        StripeEvent.select().delete(bulk=True)
    evt = an_event()
    body = stripe_events.encode(evt)
    with database_held_by_another_writer(admin_config):
        status, answer, headers = call(app, "POST", WEBHOOK, body=body, headers=signed(body),
                                       raw=True)
        assert status == 503 and int(headers["Retry-After"]) > 0
        assert "busy" in json.loads(answer)["error"]
        status, answer, headers = call(app, "POST", f"/api/instances/{store}/stop/", body={},
                                       headers=AUTH, raw=True)
        assert status == 503 and "Retry-After" in headers
    with db_session:
        assert StripeEvent.select().count() == 0 and Job.select().count() == 0
        assert WebhookDelivery.select().count() == 0  # a busy delivery can only be logged
    # Stripe sends it again; now it is recorded, once.
    assert call(app, "POST", WEBHOOK, body=body, headers=signed(body))[0] == 200
    with db_session:
        assert select(e.stripe_id for e in StripeEvent)[:] == [evt["id"]]


# -- every delivery written down -----------------------------------------------------------

def test_every_webhook_delivery_is_written_down(app):
    evt = an_event()
    body = stripe_events.encode(evt)
    for _ in range(2):
        assert call(app, "POST", WEBHOOK, body=body, headers=signed(body),
                    remote_addr="198.51.100.20")[0] == 200
    assert call(app, "POST", WEBHOOK, body=body, headers={"Stripe-Signature": sign(
        body, "whsec_wrong")}, remote_addr="203.0.113.9")[0] == 400
    with db_session:
        rows = [(d.outcome, d.stripe_id, d.type, d.address, d.reason)
                for d in WebhookDelivery.select().order_by(WebhookDelivery.id)]
        assert StripeEvent.get(stripe_id=evt["id"]).duplicates == 1
    assert rows[:2] == [("accepted", evt["id"], evt["type"], "198.51.100.20", None),
                        ("duplicate", evt["id"], evt["type"], "198.51.100.20", None)]
    outcome, stripe_id, _, address, reason = rows[2]
    assert (outcome, stripe_id, address) == ("rejected", None, "203.0.113.9")
    assert "bad signature" in reason


def test_rejected_deliveries_are_written_down_only_up_to_a_quota(app):
    """An attacker's flood is answered (400) but only counted, so it cannot fill the disk."""
    statuses = [call(app, "POST", WEBHOOK, body=b"{}", remote_addr="192.0.2.50")[0]
                for _ in range(25)]
    assert statuses == [400] * 25
    assert call(app, "POST", WEBHOOK, body=b"{}", remote_addr="192.0.2.51")[0] == 400
    with db_session:
        per_address = dict(select((d.address, count(d)) for d in WebhookDelivery
                                  if d.outcome == "rejected")[:])
    assert per_address == {"192.0.2.50": 10, "192.0.2.51": 1}
    status, text, _ = call(app, "GET", "/metrics", headers=AUTH, raw=True)
    assert 'provisioner_webhooks_total{result="rejected_unrecorded"} 15' in text.decode()


# -- the real server: framing, size, slow clients --------------------------------------------

@contextmanager
def served(config):
    """The app in the real cheroot server of `provisioner serve`, on a loopback port."""
    port = free_port()
    httpd = server.make_server(config, create_app(config), "127.0.0.1", port)
    thread = threading.Thread(target=httpd.start, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not httpd.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield port
    finally:
        httpd.stop()
        thread.join(timeout=10)


def exchange(port: int, data: bytes, half_close: bool = False, timeout: float = 20) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def post(path: str, headers: bytes, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n").encode() + headers + b"\r\n" + body


@pytest.mark.parametrize("chunks, expected, reason", [
    (b"zz\r\nabc\r\n0\r\n\r\n", b"400", b"malformed chunked body"),
    (b"3\r\nabcXX0\r\n\r\n", b"400", b"malformed chunked body"),
    (b"-1\r\nabc\r\n0\r\n\r\n", b"400", b"malformed chunked body"),
    (b"ffffffffffffffffffff\r\nabc", b"413", str(MAX_BODY_BYTES).encode()),
    (b"f" * 20_000, b"400", b"malformed chunked body"),  # a size line without end
    (b"5\r\nab", b"400", b"malformed chunked body"),
])
def test_bad_chunked_bodies_are_4xx_with_a_reason(config, chunks, expected, reason):
    with served(config) as port:
        answer = exchange(port, post("/api/check-subdomain/", b"Transfer-Encoding: chunked\r\n",
                                     chunks), half_close=True)
    assert answer.startswith(b"HTTP/1.1 " + expected) and reason in answer


def test_a_good_chunked_body_reaches_the_app_once_decoded(config):
    body = stripe_events.encode(an_event())
    framed = b"".join(b"%x\r\n%s\r\n" % (len(body[n:n + 100]), body[n:n + 100])
                      for n in range(0, len(body), 100)) + b"0\r\n\r\n"
    with served(config) as port:
        answer = exchange(port, post(WEBHOOK, b"Transfer-Encoding: chunked\r\nStripe-Signature: "
                                     + sign(body).encode() + b"\r\n", framed))
    assert answer.startswith(b"HTTP/1.1 200") and b'"received": true' in answer


@pytest.mark.parametrize("headers, body, expected", [
    (b"Content-Length: 99999999999\r\n", b"{}", b"413"),
    (b"Content-Length: -5\r\n", b"{}", b"400"),
    (b"Content-Length: 400\r\n", b"{}", b"400"),  # the body ends early
    (b"Transfer-Encoding: gzip\r\n", b"{}", b"400"),
])
def test_lengths_and_codings_the_server_cannot_honour_are_4xx(config, headers, body, expected):
    with served(config) as port:
        answer = exchange(port, post("/api/check-subdomain/", headers, body), half_close=True)
    assert answer.startswith(b"HTTP/1.1 " + expected), answer[:200]


def test_slow_clients_are_dropped_and_cannot_starve_the_webhook(config, monkeypatch):
    """More slow clients than threads, each trickling a body: each is dropped once its
    request has taken too long, and a real webhook sent after them is answered 200."""
    monkeypatch.setattr(server, "REQUEST_READ_SECONDS", 1)
    monkeypatch.setattr(server, "SOCKET_TIMEOUT_SECONDS", 1)
    small = dataclasses.replace(config, server_threads=4)
    stop = threading.Event()
    ends: list[str] = []

    def slow_client(port: int, started: threading.Barrier) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(post(WEBHOOK, b"Content-Length: 5000\r\n", b"{"))
            started.wait()
            sock.settimeout(0.3)  # the trickle's pace: a byte, then a look for an answer
            while not stop.is_set():
                try:
                    sock.sendall(b" ")
                    answer = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    ends.append("reset")
                    return
                ends.append(answer[:12].decode() if answer else "closed")
                return
            ends.append("still open")

    evt = an_event()
    body = stripe_events.encode(evt)
    with served(small) as port:
        started = threading.Barrier(9)
        clients = [threading.Thread(target=slow_client, args=(port, started)) for _ in range(8)]
        for client in clients:
            client.start()
        started.wait()
        try:
            webhook = exchange(port, post(WEBHOOK, f"Stripe-Signature: {sign(body)}\r\n"
                                          f"Content-Length: {len(body)}\r\n".encode(), body))
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=30)
    assert webhook.startswith(b"HTTP/1.1 200")
    assert len(ends) == 8 and "still open" not in ends, ends
    assert "HTTP/1.1 408" in ends  # those it could still tell were told why
