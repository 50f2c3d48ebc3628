"""Operators can repair: retry of a failed store, replay of a recorded Stripe event,
the page of received webhooks, and the audit log of every admin action (API, pages, CLI)."""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pony.orm import db_session, flush, set_sql_debug

from provisioner import cli
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.models import AuditEntry, Instance, Job, StripeEvent, WebhookDelivery, utcnow
from provisioner.testing import stripe_events
from provisioner.web import create_app
from provisioner.worker import Worker
from tests.conftest import apply_events
from tests.wsgi import basic, call

PASSWORD = "admin-pass-123"
TOKEN = "admin-token-abcdefghijklmnop"
AUTH = basic("admin", PASSWORD)
BEARER = {"Authorization": f"Bearer {TOKEN}"}
FORM = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}


class FailingRunner:
    """An Ansible backend whose every store fails, as with the Docker engine down."""

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 **kwargs):
        return RunResult(ident=ident or "x", playbook=playbook, status="failed",
                         rc=2, artifact_dir=Path("/nonexistent"),
                         hosts={s["name"]: HostOutcome(ok=False, error="docker engine unreachable")
                                for s in stores})


@pytest.fixture
def admin_config(config):
    return dataclasses.replace(config, admin_password=PASSWORD, admin_token=TOKEN,
                               job_max_attempts=2, trusted_proxies=("10.9.0.0/16",))


@pytest.fixture
def app(admin_config):
    return create_app(admin_config)


def signup(config, name: str) -> int:
    apply_events(config, stripe_events.signup(subdomain=name, site_name=name.title(),
                                              email=f"{name}@example.com"))
    with db_session:
        return Instance.get(subdomain=name).id


@pytest.fixture
def failed_store(admin_config, recorded_runs) -> int:
    """A store whose provisioning failed every attempt: `failed`, its converge job too."""
    store = signup(admin_config, "broken-shop")
    operations.BACKEND = FailingRunner()
    try:
        Worker(admin_config).run_once()
    finally:
        operations.BACKEND = recorded_runs
    with db_session:
        assert Instance[store].status == "failed"
        assert Job.select(lambda j: j.kind == "converge" and j.state == "failed").count() == 1
    return store


@pytest.fixture
def running_store(admin_config) -> int:
    store = signup(admin_config, "fine-shop")
    Worker(admin_config).run_once()
    with db_session:
        assert Instance[store].status == "running"
    return store


def audit_rows() -> list[tuple]:
    with db_session:
        return [(a.actor, a.action, a.target, a.address, a.detail)
                for a in AuditEntry.select().order_by(AuditEntry.id)]


def csrf_of(app, path: str) -> str:
    _, html, _ = call(app, "GET", path, headers=AUTH, raw=True)
    return re.search(rb'name="csrf" value="([0-9a-f]+)"', html).group(1).decode()


# -- retry ----------------------------------------------------------------------

def test_retry_through_the_api_provisions_the_failed_store_and_is_audited(
        app, admin_config, failed_store, recorded_runs):
    recorded_runs.runs.clear()
    status, body = call(app, "POST", f"/api/instances/{failed_store}/retry/", headers=AUTH,
                        body={}, remote_addr="192.0.2.7")
    assert status == 202, body
    assert (body["status"], body["desired_state"]) == ("failed", "running")
    with db_session:
        job = Job[body["job_id"]]
        assert (job.kind, job.state) == ("converge", "queued")
    assert body["status_url"] == f"/api/jobs/{job.id}/"
    assert audit_rows() == [("admin", "retry", f"instance:{failed_store}", "192.0.2.7",
                             f"broken-shop: converge job {job.id} queued towards running")]
    Worker(admin_config).run_once()
    assert [run[0] for run in recorded_runs.runs] == ["provision.yml"]
    with db_session:
        assert Instance[failed_store].status == "running"


def test_retry_of_a_store_that_is_not_failed_is_409_with_the_reason_and_audited(
        app, running_store):
    status, body = call(app, "POST", f"/api/instances/{running_store}/retry/", headers=BEARER,
                        body={})
    assert status == 409 and "fine-shop is running" in body["error"]
    [(actor, action, target, address, detail)] = audit_rows()
    assert (actor, action, target, address) == ("token", "retry", f"instance:{running_store}",
                                                "127.0.0.1")
    assert detail.startswith("refused: store fine-shop is running")
    with db_session:
        assert not Job.select(lambda j: j.state == "queued").exists()


def test_retry_of_a_parked_store_whose_name_was_taken_meanwhile_is_409(app, admin_config):
    taken = signup(admin_config, "twin-shop")
    with db_session:
        parked = Instance(subdomain="twin-shop", site_name="Twin", admin_email="b@example.com",
                          port=0, docker_host="-", live=False, status="needs_attention",
                          desired_state="needs_attention")
        flush()
        parked_id = parked.id
    status, body = call(app, "POST", f"/api/instances/{parked_id}/retry/", headers=AUTH, body={})
    assert status == 409 and "twin-shop now holds" in body["error"]
    with db_session:
        assert Instance[parked_id].status == "needs_attention" and Instance[taken].live


@pytest.mark.parametrize("headers, status, reason", [
    ({**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ({**AUTH, "Origin": "https://evil.example"}, 403, "cross-site"),
    ({}, 401, "credentials"),
])
def test_retry_refuses_forms_other_sites_and_strangers_and_writes_no_audit(
        app, failed_store, headers, status, reason):
    answer, body = call(app, "POST", f"/api/instances/{failed_store}/retry/", headers=headers,
                        body={})
    assert answer == status and reason in body["error"]
    assert audit_rows() == []
    with db_session:
        assert Instance[failed_store].status == "failed"


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/instances/999/retry/"), ("POST", "/api/events/999/replay/"),
    ("POST", f"/api/instances/{2**64}/retry/"), ("POST", f"/api/events/{2**70}/replay/"),
    ("GET", f"/api/events/{2**64}/"), ("GET", "/api/events/-3/")])
def test_repairs_of_unknown_ids_are_404(app, method, path):
    status, body = call(app, method, path, headers=AUTH, body={})
    assert status == 404 and "no " in body["error"]


@pytest.mark.parametrize("action", ["start", "restart"])
@pytest.mark.parametrize("built", [False, True])
def test_start_and_restart_of_a_failed_store_point_at_retry(app, failed_store, action, built):
    """A failed store was a dead end: Start said "no container" (never built) or ran
    start.yml over a half-made store (built), neither of which repairs it."""
    if built:
        with db_session:
            Instance[failed_store].provisioned_at = utcnow()
    status, body = call(app, "POST", f"/api/instances/{failed_store}/{action}/", headers=AUTH,
                        body={})
    assert status == 409, body
    assert "use Retry" in body["error"] and f"/api/instances/{failed_store}/retry/" in \
        body["error"]
    with db_session:
        assert not Job.select(lambda j: j.kind == "action").exists()


def test_the_retry_button_is_on_failed_stores_only_and_works(app, admin_config, failed_store,
                                                             running_store):
    _, html, _ = call(app, "GET", f"/admin/instances/{running_store}/", headers=AUTH, raw=True)
    assert b'id="retry-button"' not in html
    for status in ("failed", "out_of_step", "needs_attention"):
        with db_session:
            Instance[failed_store].status = status
        _, html, _ = call(app, "GET", f"/admin/instances/{failed_store}/", headers=AUTH, raw=True)
        assert b'id="retry-button"' in html, status
    with db_session:
        Instance[failed_store].status = "failed"
    path = f"/admin/instances/{failed_store}/retry/"
    assert call(app, "POST", path, body=b"csrf=forged", headers=FORM, raw=True)[0] == 403
    assert audit_rows() == []
    token = csrf_of(app, f"/admin/instances/{failed_store}/")
    status, _, headers = call(app, "POST", path, body=f"csrf={token}".encode(), headers=FORM,
                              raw=True)
    assert status == 303 and "retry%20queued%20as%20job" in headers["Location"]
    Worker(admin_config).run_once()
    _, html, _ = call(app, "GET", urlsplit(headers["Location"]).path, headers=AUTH, raw=True)
    assert b'id="status">running<' in html and b'id="retry-button"' not in html
    # The store page shows who retried it.
    assert re.search(rb'<td>admin<br><span class="muted">[^<]+ from 127.0.0.1</span></td>'
                     rb'<td><b>retry</b></td>', html)


# -- the audit log of every admin action --------------------------------------

def test_every_admin_action_is_audited_with_actor_and_client_address(app, admin_config,
                                                                     running_store):
    behind_proxy = {"X-Forwarded-For": "203.0.113.9"}
    for action in ("stop", "start", "restart"):
        status, body = call(app, "POST", f"/api/instances/{running_store}/{action}/",
                            headers={**BEARER, **behind_proxy}, body={}, remote_addr="10.9.0.1")
        assert status == 202, (action, body)
        Worker(admin_config).run_once()
    token = csrf_of(app, f"/admin/instances/{running_store}/")
    for action in ("suspend", "unsuspend"):
        status, _, _ = call(app, "POST", f"/admin/instances/{running_store}/{action}/",
                            body=f"csrf={token}".encode(), headers=FORM, raw=True,
                            remote_addr="198.51.100.4")
        assert status == 303
        Worker(admin_config).run_once()
    rows = audit_rows()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("token", "stop", f"instance:{running_store}", "203.0.113.9"),
        ("token", "start", f"instance:{running_store}", "203.0.113.9"),
        ("token", "restart", f"instance:{running_store}", "203.0.113.9"),
        ("admin", "suspend", f"instance:{running_store}", "198.51.100.4"),
        ("admin", "unsuspend", f"instance:{running_store}", "198.51.100.4")]
    assert all(re.fullmatch(r"fine-shop: job \d+ queued", r[4]) for r in rows)


def test_a_refused_action_is_audited_as_refused(app, admin_config):
    store = signup(admin_config, "never-built")
    status, _ = call(app, "POST", f"/api/instances/{store}/stop/", headers=AUTH, body={})
    assert status == 409
    [(actor, action, _, _, detail)] = audit_rows()
    assert (actor, action) == ("admin", "stop") and detail == \
        "refused: store never-built has no container to stop"


def test_audit_api_and_page_are_paged_newest_first_and_searchable(app, admin_config,
                                                                  running_store):
    with db_session:
        for n in range(120):
            AuditEntry(actor="admin" if n % 2 else "token", action="stop",
                       target=f"instance:{running_store if n % 3 else 999}",
                       detail=f"entry {n}", address="127.0.0.1")
    status, body = call(app, "GET", "/api/audit/", headers=AUTH, query="per_page=50&page=3")
    assert status == 200 and body["total"] == 120 and len(body["items"]) == 20
    assert body["items"][0]["detail"] == "entry 19" and body["items"][-1]["detail"] == "entry 0"
    _, body = call(app, "GET", "/api/audit/", headers=AUTH, query="q=ENTRY 11")
    assert sorted(i["detail"] for i in body["items"]) == ["entry 11", "entry 110",
                                                          "entry 111", "entry 112",
                                                          "entry 113", "entry 114",
                                                          "entry 115", "entry 116",
                                                          "entry 117", "entry 118",
                                                          "entry 119"]
    _, body = call(app, "GET", "/api/audit/", headers=AUTH, query="target=instance:999")
    assert body["total"] == 40 and body["items"][0]["link"] == "/admin/instances/999/"
    assert call(app, "GET", "/api/audit/", headers=AUTH, query="page=0")[0] == 400
    _, body = call(app, "GET", "/api/audit/", headers=AUTH, query="page=1000000")
    assert body["items"] == [] and body["total"] == 120
    status, html, _ = call(app, "GET", "/admin/audit/", headers=AUTH, query="page=2", raw=True)
    assert status == 200 and b"entry 69" in html and b"entry 70" not in html
    assert b"page 2 of 3" in html and b'href="?page=3"' in html and b'href="?page=1"' in html
    # The store's page shows its last few entries, newest first.
    _, html, _ = call(app, "GET", f"/admin/instances/{running_store}/", headers=AUTH, raw=True)
    shown = re.findall(rb"entry (\d+)", html)
    assert shown[:3] == [b"119", b"118", b"116"] and len(shown) == 10


# -- replay -------------------------------------------------------------------

def failed_payment_event(config) -> tuple[int, str]:
    """A signup whose invoice.paid event gave up (as after a long outage): the store
    waits in pending for a payment that was in fact made."""
    checkout, paid = stripe_events.signup(subdomain="late-shop", site_name="Late",
                                          email="late@example.com")
    checkout["data"]["object"]["payment_status"] = "unpaid"
    apply_events(config, [checkout])
    with db_session:
        event = StripeEvent(stripe_id=paid["id"], type=paid["type"], payload=json.dumps(paid),
                            failed_at=utcnow(), error="OperationalError: database is locked")
        Job(kind="event", event=event, state="failed", attempts=5, last_error=event.error)
        assert Instance.get(subdomain="late-shop").desired_state == "pending"
        return event.id, paid["id"]


def test_replay_applies_the_event_again_and_the_store_is_provisioned(
        app, admin_config, recorded_runs):
    event_id, stripe_id = failed_payment_event(admin_config)
    status, body = call(app, "POST", f"/api/events/{event_id}/replay/", headers=AUTH, body={})
    assert status == 202
    status, again = call(app, "POST", f"/api/events/{event_id}/replay/", headers=AUTH, body={})
    assert status == 409 and f"{stripe_id} is already queued as job {body['job_id']}" in \
        again["error"]
    _, detail = call(app, "GET", f"/api/events/{event_id}/", headers=AUTH)
    assert detail["state"] == "queued" and "payload" not in detail
    Worker(admin_config).run_once()
    with db_session:
        event = StripeEvent[event_id]
        assert event.processed_at and event.failed_at is None and event.error is None
        assert Job[body["job_id"]].state == "done"
        assert Instance.get(subdomain="late-shop").status == "running"
    assert [run[0] for run in recorded_runs.runs] == ["provision.yml"]
    assert [(r[0], r[1], r[2]) for r in audit_rows()] == [
        ("admin", "replay", f"event:{event_id}"), ("admin", "replay", f"event:{event_id}")]
    assert audit_rows()[1][4].startswith("refused: ")


def test_replay_refuses_forms_and_other_sites(app, admin_config):
    event_id, _ = failed_payment_event(admin_config)
    for headers, status in (({**AUTH, "Content-Type": "text/plain"}, 415),
                            ({**AUTH, "Origin": "http://evil.example"}, 403)):
        assert call(app, "POST", f"/api/events/{event_id}/replay/", headers=headers,
                    body={})[0] == status
    with db_session:
        assert StripeEvent[event_id].failed_at is not None
    assert audit_rows() == []


def test_the_replay_button_on_the_webhook_row(app, admin_config):
    event_id, stripe_id = failed_payment_event(admin_config)
    with db_session:
        WebhookDelivery(outcome="accepted", stripe_id=stripe_id, type="invoice.paid",
                        address="127.0.0.1")
        WebhookDelivery(outcome="duplicate", stripe_id=stripe_id, type="invoice.paid")
        StripeEvent[event_id].duplicates = 1
    _, html, _ = call(app, "GET", "/admin/webhooks/", headers=AUTH, raw=True)
    text = html.decode()
    assert f'href="/admin/events/{event_id}/"' in text and "database is locked" in text
    assert "1 duplicate(s)" in text and 'class="state-failed">failed<' in text
    forms = re.findall(r'action="(/admin/events/\d+/replay/)"', text)
    assert forms == [f"/admin/events/{event_id}/replay/"]  # on the accepted row only
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', text).group(1)
    assert call(app, "POST", forms[0], body=b"csrf=nope", headers=FORM, raw=True)[0] == 403
    status, _, headers = call(app, "POST", forms[0], body=f"csrf={token}".encode(),
                              headers=FORM, raw=True)
    location = urlsplit(headers["Location"])
    assert status == 303 and location.path == f"/admin/events/{event_id}/"
    assert location.query.startswith("flash=replay%20queued%20as%20job")
    _, html, _ = call(app, "GET", location.path, headers=AUTH, raw=True)
    assert b'id="event-state">queued<' in html and b'id="replay-button"' not in html
    Worker(admin_config).run_once()
    _, html, _ = call(app, "GET", f"/admin/events/{event_id}/", headers=AUTH, raw=True)
    assert b'id="event-state">processed<' in html and b"admin" in html


# -- the webhooks page ----------------------------------------------------------

@pytest.fixture
def deliveries(admin_config) -> dict:
    """450 deliveries: accepted events (some applied, one failed), duplicates, rejections
    with reasons and busy answers."""
    start = utcnow() - timedelta(hours=1)
    with db_session:
        for n in range(450):
            outcome = ("accepted", "duplicate", "rejected", "busy", "accepted")[n % 5]
            stripe_id = None if outcome == "rejected" else f"evt_{n:04d}"
            kind = "invoice.paid" if n % 2 else "customer.subscription.updated"
            if outcome == "accepted":
                StripeEvent(stripe_id=stripe_id, type=kind, payload="{}",
                            processed_at=None if n == 5 else start,
                            failed_at=start if n == 5 else None,
                            error="KeyError: 'data'" if n == 5 else None)
            WebhookDelivery(at=start + timedelta(seconds=n), outcome=outcome,
                            stripe_id=stripe_id, type=None if outcome == "rejected" else kind,
                            reason=(f"bad signature: no signatures found {n}"
                                    if outcome == "rejected" else
                                    "database busy" if outcome == "busy" else None),
                            address="127.0.0.1")
    return {"total": 450}


def test_webhooks_api_pages_and_filters_hundreds_of_deliveries(app, deliveries):
    status, body = call(app, "GET", "/api/webhooks/", headers=AUTH)
    assert status == 200 and body["total"] == 450 and len(body["items"]) == 50
    assert body["items"][0]["stripe_id"] == "evt_0449"  # newest first
    _, last = call(app, "GET", "/api/webhooks/", headers=AUTH, query="per_page=200&page=3")
    assert len(last["items"]) == 50 and last["items"][-1]["stripe_id"] == "evt_0000"
    _, body = call(app, "GET", "/api/webhooks/", headers=AUTH, query="outcome=rejected")
    assert body["total"] == 90 and all(i["reason"].startswith("bad signature") and
                                       i["event"] is None for i in body["items"])
    _, body = call(app, "GET", "/api/webhooks/", headers=AUTH, query="q=signatures found 12")
    assert sorted(i["reason"][-3:] for i in body["items"]) == [" 12", "122", "127"]
    _, body = call(app, "GET", "/api/webhooks/", headers=AUTH, query="q=EVT_0005")
    [delivery] = body["items"]
    assert delivery["event"]["state"] == "failed" and delivery["event"]["error"] == \
        "KeyError: 'data'"
    _, body = call(app, "GET", "/api/webhooks/", headers=AUTH,
                   query="q=invoice.paid&outcome=accepted&per_page=200")
    assert body["total"] == 90 and all(i["event"]["type"] == "invoice.paid"
                                       for i in body["items"])
    assert all(i["event"]["state"] in ("processed", "failed") for i in body["items"])
    _, body = call(app, "GET", "/api/webhooks/", headers=AUTH, query="q=busy&outcome=busy")
    assert body["total"] == 90
    status, body = call(app, "GET", "/api/webhooks/", headers=AUTH, query="outcome=lost")
    assert status == 400 and "accepted, duplicate, rejected, busy" in body["error"]
    _, body = call(app, "GET", "/api/webhooks/", headers=AUTH, query="page=1000000")
    assert body["items"] == [] and body["total"] == 450


def test_webhooks_queries_stay_bounded(app, deliveries, caplog):
    """Never all rows: each query on the deliveries is a count or one page."""
    caplog.set_level(logging.DEBUG, logger="pony.orm.sql")
    set_sql_debug(True, show_values=False)
    try:
        assert call(app, "GET", "/api/webhooks/", headers=AUTH, query="q=evt")[0] == 200
        assert call(app, "GET", "/admin/webhooks/", headers=AUTH, query="page=4",
                    raw=True)[0] == 200
    finally:
        set_sql_debug(False)
    statements = [r.getMessage() for r in caplog.records if r.name == "pony.orm.sql"]
    on_deliveries = [s for s in statements if 'FROM "WebhookDelivery"' in s]
    assert len(on_deliveries) == 4, statements
    for sql in on_deliveries:
        assert "COUNT(*)" in sql or "LIMIT 50" in sql, sql
    on_events = [s for s in statements if 'FROM "StripeEvent"' in s]
    assert on_events and all('"stripe_id" IN (' in s for s in on_events)


def test_webhooks_page_searches_and_pages_keeping_the_filters(app, deliveries):
    status, html, headers = call(app, "GET", "/admin/webhooks/", headers=AUTH,
                                 query="outcome=rejected&q=signature&page=2", raw=True)
    text = html.decode()
    assert status == 200 and headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert text.count('<span class="outcome-rejected">rejected</span>') == 40
    assert "page 2 of 2" in text and 'href="?outcome=rejected&amp;q=signature&amp;page=1"' in text
    assert 'id="next-page"' not in text
    nonce = re.search(r"nonce-([\w-]+)", headers["Content-Security-Policy"]).group(1)
    assert f'<style nonce="{nonce}">' in text and "<script" not in text
    for nonsense in ("nonsense", "%C2%B2", "9" * 5000, "0"):
        status, html, _ = call(app, "GET", "/admin/webhooks/", headers=AUTH,
                               query=f"page={nonsense}", raw=True)
        assert status == 200 and b"page 1 of 9" in html and \
            html.count(b"replay-button") == 20, nonsense


# -- the CLI ------------------------------------------------------------------

@pytest.fixture
def cli_env(monkeypatch, base_env, tmp_path):
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROVISIONER_ENV_FILE", str(tmp_path / "no.env"))
    return f"cli:{getpass.getuser()}"


def test_cli_retry_queues_and_waits(cli_env, config, failed_store, recorded_runs, capsys):
    assert cli.main(["retry", "broken-shop"]) == 0
    out = capsys.readouterr().out
    with db_session:
        job = Job.select(lambda j: j.kind == "converge" and j.state == "queued").first()
    assert f"queued job {job.id}: converge" in out and "billing says running" in out
    assert audit_rows()[-1][:4] == (cli_env, "retry", f"instance:{failed_store}", None)
    with db_session:  # the store fails again: --wait drains and reports it
        Instance[failed_store].status = "failed"
    recorded_runs.runs.clear()
    assert cli.main(["retry", str(failed_store), "--wait"]) == 0
    assert f"store {failed_store} is running" in capsys.readouterr().out
    assert [run[0] for run in recorded_runs.runs] == ["provision.yml"]


def test_cli_retry_refused_or_unknown_exits_1_with_the_reason(cli_env, running_store, capsys):
    assert cli.main(["retry", "fine-shop"]) == 1
    assert "retry refused: store fine-shop is running" in capsys.readouterr().err
    assert audit_rows()[-1][:2] == (cli_env, "retry")
    assert cli.main(["retry", "nobody-shop"]) == 1
    assert "no store named 'nobody-shop'" in capsys.readouterr().err
    assert cli.main(["retry", "9999999999"]) == 1
    assert "no instance 9999999999" in capsys.readouterr().err


def test_cli_retry_wait_exits_1_when_the_store_fails_again(cli_env, failed_store, capsys):
    operations.BACKEND = FailingRunner()
    assert cli.main(["retry", "broken-shop", "--wait"]) == 1
    assert "is failed: docker engine unreachable" in capsys.readouterr().out


def test_cli_replay_by_stripe_id(cli_env, config, capsys):
    event_id, stripe_id = failed_payment_event(config)
    assert cli.main(["replay", stripe_id, "--wait"]) == 0
    out = capsys.readouterr().out
    assert f"replay of {stripe_id} (invoice.paid): queued job" in out
    assert f"event {stripe_id} is processed" in out
    assert audit_rows()[-1][:3] == (cli_env, "replay", f"event:{event_id}")
    with db_session:
        assert Instance.get(subdomain="late-shop").status == "running"
    assert cli.main(["replay", "evt_unknown"]) == 1
    assert "no recorded event 'evt_unknown'" in capsys.readouterr().err
