"""Alerts: one incident is one "opened" and one "resolved" per target (email, a generic
JSON webhook, a Slack one), however many sweeps see it; a target that fails is retried
with backoff and ends "failed", visibly; a webhook's URL (a secret) is kept nowhere.
The receivers are real: an HTTP server on 127.0.0.1 and aiosmtpd."""

from __future__ import annotations

import dataclasses
import email
import json
import logging
import secrets
import sqlite3
import threading
from datetime import timedelta
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from pony.orm import db_session

from provisioner import alerts, maintenance, scheduler
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.models import AlertDelivery, AlertIncident, Instance, Job, utcnow
from provisioner.testing.stack import free_port
from tests.test_health_history import SweepRunner, running_store

TOKEN = "T0-" + secrets.token_hex(12)


class Receiver:
    """A webhook endpoint: records each POST; answers 500 while `failures` > 0."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        self.failures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, json.loads(body)))
                failing = receiver.failures > 0
                receiver.failures -= failing
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict]:
        return [body for _, body in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Sink:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def receivers():
    generic, slack = Receiver(), Receiver()
    yield generic, slack
    generic.close()
    slack.close()


@pytest.fixture
def sink():
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield sink, controller.port
    controller.stop()


@pytest.fixture
def alert_config(config, receivers, sink):
    generic, slack = receivers
    return dataclasses.replace(
        config, admin_notify_email="ops@example.com", email_host="127.0.0.1",
        email_port=sink[1], alert_webhooks=(generic.url, "slack:" + slack.url))


@pytest.fixture(autouse=True)
def no_incidents_left():
    """The shared reset leaves incidents (their store set to NULL): none of another
    test's may be delivered here, nor ours elsewhere."""
    def empty():
        with db_session:
            AlertDelivery.select().delete(bulk=True)
            AlertIncident.select().delete(bulk=True)
    empty()
    yield
    empty()


class DeadRestart(SweepRunner):
    """Sick stores fail their check, and the restart after it does not bring them back."""

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 **kwargs):
        if playbook == "health.yml":
            return super().__call__(config, playbook, stores, secrets, on_event, ident)
        return RunResult(ident=ident, playbook=playbook, status="failed", rc=2,
                         artifact_dir=Path("/nonexistent"),
                         hosts={s["name"]: HostOutcome(
                             ok=s["name"] not in self.sick,
                             error="no answer on /health/ after 60 s"
                             if s["name"] in self.sick else None) for s in stores})


def sweep(config, runner) -> int:
    """One health sweep then one delivery round, as `serve` runs them; how many sent."""
    previous, operations.BACKEND = operations.BACKEND, runner
    try:
        maintenance.health_sweep(config)
    finally:
        operations.BACKEND = previous
    return alerts.deliver_due(config)


def test_one_outage_is_one_alert_and_one_resolve_per_target_across_sweeps(
        alert_config, receivers, sink):
    generic, slack = receivers
    store = running_store(alert_config, "down-shop")
    welcome = len(sink[0].messages)

    assert sweep(alert_config, DeadRestart(sick={"down-shop"})) == 3, \
        "the restart did not bring it back: email, generic and Slack each told once"
    for _ in range(4):  # still down, past HEALTH_ALERT_AFTER: the same incident
        assert sweep(alert_config, DeadRestart(sick={"down-shop"})) == 0
    with db_session:
        [incident] = AlertIncident.select()[:]
        assert (incident.kind, incident.resolved_at) == ("store_down", None)
        assert "checks in a row" in incident.summary, "the summary follows the outage"
        assert not Job.select(lambda j: j.kind == "notify"
                              and j.detail.startswith("admin_unhealthy")).exists(), \
            "the old admin email would double the alert"

    assert sweep(alert_config, SweepRunner()) == 3, "healthy again: one resolved each"
    for _ in range(3):
        assert sweep(alert_config, SweepRunner()) == 0

    assert [b["event"] for b in generic.bodies()] == ["opened", "resolved"]
    opened, resolved = generic.bodies()
    assert set(opened) == {"event", "kind", "key", "store", "summary", "opened_at",
                           "resolved_at", "admin_url"}
    assert (opened["kind"], opened["key"], opened["store"], opened["resolved_at"]) == \
        ("store_down", f"store_down:{store}", "down-shop", None)
    assert opened["admin_url"] == f"{alert_config.public_url}/admin/instances/{store}/"
    assert resolved["resolved_at"] is not None and resolved["opened_at"] == opened["opened_at"]

    assert [list(b) for b in slack.bodies()] == [["text"], ["text"]]
    assert slack.bodies()[0]["text"].startswith("ALERT store down-shop: store down\n")
    assert slack.bodies()[1]["text"].startswith("RESOLVED store down-shop: store down\n")
    assert f"/admin/instances/{store}/" in slack.bodies()[0]["text"]

    messages = sink[0].messages[welcome:]
    assert [m["Subject"] for m in messages] == [
        "[provisioner] ALERT store down-shop: store down",
        "[provisioner] RESOLVED store down-shop: store down"]
    assert messages[0]["To"] == "ops@example.com"
    with db_session:
        assert AlertIncident.select().count() == 1
        assert {(d.target, d.event, d.status) for d in AlertDelivery.select()} == {
            (t, e, "sent") for e in ("opened", "resolved") for t in (
                "email", f"webhook 1 (127.0.0.1:{generic.server.server_port})",
                f"webhook 2 (127.0.0.1:{slack.server.server_port})")}


def test_a_new_outage_after_the_resolve_is_a_new_incident(alert_config, receivers):
    generic, _ = receivers
    running_store(alert_config, "flaky-shop")
    for runner in (DeadRestart(sick={"flaky-shop"}), SweepRunner(),
                   DeadRestart(sick={"flaky-shop"})):
        sweep(alert_config, runner)
    assert [b["event"] for b in generic.bodies()] == ["opened", "resolved", "opened"]
    with db_session:
        assert AlertIncident.select().count() == 2
        assert len(alerts.open_incidents()) == 1 and len(alerts.recent(10)) == 2


def test_an_incident_that_cleared_before_delivery_is_still_told_open_then_resolved(
        alert_config, receivers):
    generic, slack = receivers
    with db_session:
        alerts.raise_alert("cert_renewal_failed", "shop.example.org: ACME said no",
                           extra="shop.example.org")
        assert alerts.resolve("cert_renewal_failed", extra="shop.example.org")
        assert not alerts.resolve("cert_renewal_failed", extra="shop.example.org")
    alerts.deliver_due(alert_config)
    assert [b["event"] for b in generic.bodies()] == ["opened", "resolved"]
    assert generic.bodies()[0]["store"] is None
    assert generic.bodies()[0]["key"] == "cert_renewal_failed:shop.example.org"
    assert len(slack.requests) == 2
    assert alerts.deliver_due(alert_config) == 0


def test_a_failing_receiver_is_retried_with_backoff_until_it_takes_it(
        alert_config, receivers, sink):
    generic, slack = receivers
    generic.failures = 2
    with db_session:
        alerts.raise_alert("backup_failed", "store x: backup failed: disk full")
    start = utcnow()
    assert alerts.deliver_due(alert_config, now=start) == 2  # Slack and email took it
    assert len(generic.requests) == 1
    label = f"webhook 1 (127.0.0.1:{generic.server.server_port})"
    with db_session:
        delivery = AlertDelivery.get(target=label)
        assert (delivery.status, delivery.attempts, delivery.last_error) == \
            ("pending", 1, "HTTP 500")
        assert delivery.next_try_at == start + alerts.backoff(1)
    assert alerts.deliver_due(alert_config, now=start + timedelta(seconds=29)) == 0
    assert len(generic.requests) == 1, "retried before its backoff"
    later = start + alerts.backoff(1)
    assert alerts.deliver_due(alert_config, now=later) == 0  # the second 500
    assert alerts.deliver_due(alert_config, now=later + alerts.backoff(2)) == 1
    assert len(generic.requests) == 3 and generic.bodies()[0] == generic.bodies()[2]
    with db_session:
        delivery = AlertDelivery.get(target=label)
        assert (delivery.status, delivery.attempts, delivery.last_error) == ("sent", 3, None)
    assert len(slack.requests) == 1 and len(sink[0].messages) == 1, "others told twice"


def test_after_max_attempts_a_delivery_is_failed_and_shown(alert_config, receivers):
    generic, _ = receivers
    generic.failures = 10_000
    with db_session:
        alerts.raise_alert("disk_full", "store x: data takes 950 MiB")
    now = utcnow()
    for _ in range(alerts.MAX_ATTEMPTS + 3):
        alerts.deliver_due(alert_config, now=now)
        now += alerts.BACKOFF_CAP
    assert len(generic.requests) == alerts.MAX_ATTEMPTS
    assert alerts.backoff(alerts.MAX_ATTEMPTS) == timedelta(hours=1), "the cap"
    with db_session:
        assert alerts.deliveries_failed() == 1
        [shown] = alerts.open_incidents()
        failed = [d for d in shown["deliveries"] if d["status"] == "failed"]
        assert failed == [{
            "target": f"webhook 1 (127.0.0.1:{generic.server.server_port})",
            "event": "opened", "status": "failed", "attempts": alerts.MAX_ATTEMPTS,
            "last_error": "HTTP 500", "sent_at": None, "next_try_at": None}]


def test_a_webhook_url_is_kept_nowhere(alert_config, receivers, sink, caplog):
    """Its token is in the path: not in a log record, a DB row, an email, a dashboard."""
    port = free_port()
    dead = f"http://127.0.0.1:{port}/services/{TOKEN}/dead"  # refuses connections
    leaky = dataclasses.replace(alert_config,
                                alert_webhooks=alert_config.alert_webhooks + (dead,))
    receivers[0].failures = 1
    caplog.set_level(logging.DEBUG)
    with db_session:
        alerts.raise_alert("provision_failed", "store y: converge failed: boom")
    alerts.deliver_due(leaky)
    alerts.deliver_due(leaky, now=utcnow() + timedelta(hours=2))
    with db_session:
        dead_row = AlertDelivery.get(target=f"webhook 3 (127.0.0.1:{port})")
        assert dead_row.attempts == 2 and dead_row.last_error.startswith("connection failed")
        assert alerts.resolve("provision_failed")
        shown = json.dumps([alerts.open_incidents(), alerts.recent(10)])
    alerts.deliver_due(leaky, now=utcnow() + timedelta(hours=4))
    assert len(sink[0].messages) == 2
    assert all(TOKEN in path for path, _ in receivers[0].requests), "sent to the real URL"

    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "webhook 3" in logged, "the failures were logged, by label"
    assert TOKEN not in logged
    assert TOKEN not in shown
    assert all(TOKEN not in m.as_string() for m in sink[0].messages)
    with sqlite3.connect(alert_config.database_path) as raw:
        dump = "\n".join(raw.iterdump())
    assert "webhook 3" in dump and TOKEN not in dump
    assert TOKEN not in repr(alerts.targets(leaky))


def test_untrusted_text_is_data_in_the_email_and_slack(alert_config, receivers, sink):
    with db_session:
        alerts.raise_alert("backup_failed", "store z: <script>x</script> <!channel> & co")
    alerts.deliver_due(alert_config)
    [message] = sink[0].messages
    html = message.get_body(("html",)).get_content()
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>" not in html
    text = receivers[1].bodies()[0]["text"]
    assert "&lt;!channel&gt; &amp; co" in text and "<!channel>" not in text
    assert receivers[0].bodies()[0]["summary"].endswith("<!channel> & co"), \
        "JSON carries the text as it is"


PLANS = """
[[plan]]
key = "small"
name = "Small"
price_id = "price_small"
price_pence = 1000
memory_mb = 256
cpus = 0.5
pids_limit = 128
disk_mb = 1000
"""


def test_disk_full_opens_at_the_percent_and_clears_below(alert_config, receivers, tmp_path):
    generic, _ = receivers
    (tmp_path / "plans.toml").write_text(PLANS)
    disk_config = dataclasses.replace(alert_config, plans_file=str(tmp_path / "plans.toml"),
                                      alert_disk_percent=90)
    with db_session:
        Instance(subdomain="disk-shop", site_name="Disk", admin_email="d@example.com",
                 port=19150, status="running", desired_state="running")

    def measure(mib: float) -> None:
        with db_session:
            maintenance._record_disk_usage(disk_config, {"disk-shop": mib})
        alerts.deliver_due(disk_config)

    measure(899.0)
    assert generic.requests == [], "below 90% of 1000 MiB"
    measure(900.0)
    measure(1200.0)
    assert [b["event"] for b in generic.bodies()] == ["opened"]
    assert generic.bodies()[0]["summary"] == \
        "store disk-shop: data takes 900 MiB, 90% of the plan's 1000 MiB (alert at 90%)"
    with db_session:
        [incident] = AlertIncident.select()[:]
        assert "1200 MiB" in incident.summary, "the open incident follows the figures"
    measure(850.0)
    measure(800.0)
    assert [b["event"] for b in generic.bodies()] == ["opened", "resolved"]


def test_a_store_stopped_on_purpose_closes_its_incidents(alert_config, receivers):
    store = running_store(alert_config, "gone-shop")
    sweep(alert_config, DeadRestart(sick={"gone-shop"}))
    with db_session:
        Instance[store].status = "suspended"  # billing stopped it; no sweep checks it
    sweep(alert_config, SweepRunner())
    assert [b["event"] for b in receivers[0].bodies()] == ["opened", "resolved"]


def test_a_failed_delivery_round_is_logged_and_the_next_one_runs(alert_config, caplog,
                                                                   receivers):
    with db_session:
        alerts.raise_alert("store_down", "store q: down")
    assert scheduler.deliver_alerts(None) == 0  # no config: the round raises inside
    assert "alert delivery round failed" in caplog.text
    assert scheduler.deliver_alerts(alert_config) == 3
    assert len(receivers[0].requests) == 1
