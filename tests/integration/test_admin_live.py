"""Admin API and pages on real containers, in headless Chromium; the secret-leak check."""

from __future__ import annotations

import email
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from email import policy
from pathlib import Path

import pytest
from pony.orm import db_session, select

from provisioner.models import AnsibleRun, Instance, Job, LogEntry
from provisioner.testing import stripe_events
from tests.integration.conftest import (
    ADMIN_PASSWORD,
    ARTIFACTS,
    inspect,
    poll,
    wait_until_live,
)


def provision(service, name) -> int:
    for evt in stripe_events.signup(subdomain=name, site_name=name.title(),
                                    email=f"{name}@example.com"):
        service.post_event(evt)
    wait_until_live(name)
    with db_session:
        return Instance.get(subdomain=name).id


def wait_job(service, job_id):
    def finished():
        status, job = service.api("GET", f"/api/jobs/{job_id}/")
        return job["state"] in ("done", "failed") and job
    job = poll(finished, timeout=120, what=f"job {job_id}")
    assert job["state"] == "done", job
    return job


def test_start_stop_restart_through_the_api_change_the_real_container(service):
    store = provision(service, "api-shop")
    status, health = service.api("GET", f"/api/instances/{store}/health/")
    assert status == 200 and health["healthy"] and health["http"]["status"] == 200
    status, stats = service.api("GET", f"/api/instances/{store}/stats/")
    assert status == 200 and stats["available"] and stats["cpu_percent"].endswith("%")

    status, queued = service.api("POST", f"/api/instances/{store}/stop/")
    assert status == 202
    wait_job(service, queued["job_id"])
    assert not inspect("ebuilder_api-shop")["State"]["Running"]
    _, health = service.api("GET", f"/api/instances/{store}/health/")
    assert health["healthy"] is False and health["container"]["running"] is False
    _, detail = service.api("GET", f"/api/instances/{store}/")
    assert detail["status"] == "stopped" and detail["admin_hold"] is True

    status, queued = service.api("POST", f"/api/instances/{store}/start/")
    assert status == 202
    wait_job(service, queued["job_id"])
    assert inspect("ebuilder_api-shop")["State"]["Running"]
    started = inspect("ebuilder_api-shop")["State"]["StartedAt"]

    status, queued = service.api("POST", f"/api/instances/{store}/restart/")
    job = wait_job(service, queued["job_id"])
    assert inspect("ebuilder_api-shop")["State"]["StartedAt"] != started
    _, run = service.api("GET", f"/api/runs/{job['ansible_run']}/")
    assert run["playbook"] == "restart.yml" and run["status"] == "successful"
    assert any(t["task"] == "Show whether the container changed." and t["outcome"] == "changed"
               for t in run["tasks"])


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_admin_logs_in_opens_a_store_and_stops_it(service, browser):
    provision(service, "browser-shop")
    context = browser.new_context(http_credentials={"username": "admin",
                                                    "password": ADMIN_PASSWORD},
                                  viewport={"width": 420, "height": 900})
    page = context.new_page()
    page.goto(service.url + "/admin/")
    assert page.get_by_role("heading", name="Dashboard").is_visible()
    shot(page, "admin-dashboard")
    page.get_by_role("link", name="browser-shop").first.click()
    page.wait_for_url("**/admin/instances/*/")
    assert page.locator("#status").inner_text() == "running"
    shot(page, "admin-instance-running")
    page.locator("#stop-button").click()
    page.wait_for_selector("#status:text('stopped')", timeout=120_000)
    assert "stop queued" in page.locator(".flash").inner_text()
    shot(page, "admin-instance-stopped")
    assert not inspect("ebuilder_browser-shop")["State"]["Running"]
    run_link = page.get_by_role("link", name=re.compile(r"run \d+")).first
    run_link.click()
    page.wait_for_selector("#tasks")
    assert "stop.yml" in page.locator("h1").inner_text()
    assert page.locator("#tasks td.outcome-changed").count() >= 1
    shot(page, "admin-run")
    context.close()


def test_signup_form_checks_availability_as_you_type(service, browser):
    provision(service, "taken-shop")
    page = browser.new_page()
    page.goto(service.url + "/")
    page.fill("#site_name", "My new shop")
    page.fill("#subdomain", "fresh-shop")
    page.wait_for_selector("#availability[data-state=available]")
    assert "is available" in page.locator("#availability").inner_text()
    page.fill("#subdomain", "taken-shop")
    page.wait_for_selector("#availability[data-state=unavailable]")
    assert "taken" in page.locator("#availability").inner_text()
    page.fill("#subdomain", "www")
    # A locator, not wait_for_function: the page's CSP forbids evaluating strings.
    page.locator("#availability", has_text="reserved").wait_for()
    shot(page, "signup-unavailable")
    page.close()


def _signup_through_a_killed_worker(service, name: str) -> None:
    """Signup handled by a `provisioner worker` that is SIGKILLed while its ansible run
    has the customer's password in its extra vars; then a worker starts again."""
    from provisioner.worker import recover_abandoned

    runs_dir = service.config.ansible_runs_dir
    before = set(runs_dir.glob("*/env/extravars"))
    service.paused.set()
    try:
        for evt in stripe_events.signup(subdomain=name, site_name=name.title(),
                                        email=f"{name}@example.com"):
            service.post_event(evt)
        bin_dir = Path(sys.executable).parent
        worker = subprocess.Popen([str(bin_dir / "provisioner"), "worker"],
                                  env={**service.env, "PATH": f"{bin_dir}:{service.env['PATH']}"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            poll(lambda: set(runs_dir.glob("*/env/extravars")) - before, timeout=60,
                 interval=0.005, what="the worker's run to write its extra vars")
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        assert set(runs_dir.glob("*/env/extravars")) - before, \
            "the run was killed before ansible read its vars, leaving them on disk"
        recover_abandoned()
    finally:
        service.paused.clear()
        service.wake()


def test_no_secret_reaches_a_file_a_page_an_api_response_or_a_log(service, browser, caplog,
                                                                   monkeypatch):
    """A full lifecycle with an interrupted run and a health sweep, then every file in
    the data dir, every page and API answer and the service log are searched."""
    caplog.set_level(logging.DEBUG)
    # As in production, the service's own secrets are in its environment too.
    for variable, value in (("STRIPE_SECRET_KEY", service.config.stripe_secret_key),
                            ("STRIPE_WEBHOOK_SECRET", service.config.stripe_webhook_secret),
                            ("PROVISIONER_ADMIN_PASSWORD", ADMIN_PASSWORD)):
        monkeypatch.setenv(variable, value)
    sent_before = len(service.smtp.messages)
    _signup_through_a_killed_worker(service, "secret-shop")
    wait_until_live("secret-shop")
    with db_session:
        store = Instance.get(subdomain="secret-shop").id
    message = email.message_from_bytes(service.smtp.messages[sent_before], policy=policy.default)
    password = re.search(r"Temporary password: (\S+)",
                         message.get_body(("plain",)).get_content()).group(1)
    env = dict(e.split("=", 1) for e in inspect("ebuilder_secret-shop")["Config"]["Env"])
    secrets = {"temporary password": password, "SECRET_KEY": env["SECRET_KEY"],
               "Stripe secret key": service.config.stripe_secret_key,
               "webhook secret": service.config.stripe_webhook_secret,
               "admin password": ADMIN_PASSWORD}
    assert service.cli("health").returncode == 0
    assert not list(service.config.ansible_runs_dir.glob("*/env/extravars"))

    seen: dict[str, str] = {}
    with db_session:
        run_ids = list(select(r.id for r in AnsibleRun))
        job_ids = list(select(j.id for j in Job))
        seen["log entries"] = "\n".join(e.message for e in LogEntry.select())
        seen["job errors"] = "\n".join(j.last_error or "" for j in Job.select())
    api_paths = ["/api/instances/", f"/api/instances/{store}/", f"/api/instances/{store}/health/",
                 f"/api/instances/{store}/stats/", "/api/customers/", "/api/stats/", "/metrics",
                 "/api/status/", "/api/openapi.json", "/api/webhooks/", "/api/audit/"]
    api_paths += [f"/api/runs/{r}/" for r in run_ids] + [f"/api/jobs/{j}/" for j in job_ids]
    for path in api_paths:
        status, body = service.api("GET", path)
        assert status == 200, path
        seen[path] = str(body)
    context = browser.new_context(http_credentials={"username": "admin",
                                                    "password": ADMIN_PASSWORD})
    page = context.new_page()
    for path in ["/", "/status/", "/admin/", "/admin/instances/", f"/admin/instances/{store}/",
                 "/admin/customers/", "/admin/webhooks/", "/admin/audit/",
                 *[f"/admin/runs/{r}/" for r in run_ids]]:
        page.goto(service.url + path)
        seen[f"page {path}"] = page.content()
    context.close()
    # Every file the service keeps: the database, run artifacts, anything else.
    data_dir = service.config.data_dir
    for path in data_dir.rglob("*"):
        if path.is_file():
            # Read by a child: closing a descriptor of the SQLite file in this process
            # would drop SQLite's POSIX locks on it (and corrupt the WAL later).
            content = subprocess.run(["cat", str(path)], capture_output=True).stdout
            seen[str(path)] = content.decode("latin-1")
    assert any(name.endswith("/command") for name in seen) and \
        any("/job_events/" in name for name in seen)
    assert oct(data_dir.stat().st_mode & 0o777) == "0o700"
    assert oct(service.config.database_path.stat().st_mode & 0o777) == "0o600"
    # Everything logged in this process except the test SMTP server's own
    # transcript of the email it received (which must contain the password).
    seen["service log"] = "\n".join(r.getMessage() for r in caplog.records
                                    if not r.name.startswith("mail.log"))
    assert len(seen) > 20
    for where, text in seen.items():
        for name, value in secrets.items():
            assert value not in text, f"{name} leaked into {where}"


def test_admin_replays_an_event_from_the_webhooks_page_and_the_audit_log_shows_it(
        service, browser):
    """Phone-width webhooks and audit pages in Chromium: search, replay, who did it."""
    from provisioner.models import AuditEntry, StripeEvent, WebhookDelivery

    evt = stripe_events.event("checkout.session.expired",
                              {"id": "cs_test_expired_browser", "object": "checkout.session"})
    service.post_event(evt)
    unsigned = urllib.request.Request(service.url + "/api/webhook/stripe/", data=b"{}",
                                      method="POST",
                                      headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(unsigned, timeout=10)
    assert rejected.value.code == 400

    def applied():
        with db_session:
            event = StripeEvent.get(stripe_id=evt["id"])
            return event is not None and event.processed_at is not None
    poll(applied, timeout=60, what="the expired-checkout event to be applied")
    with db_session:  # until the webhook route records its deliveries itself
        if not WebhookDelivery.exists(stripe_id=evt["id"]):
            WebhookDelivery(outcome="accepted", stripe_id=evt["id"], type=evt["type"],
                            address="127.0.0.1")
        if not WebhookDelivery.exists(outcome="rejected"):
            WebhookDelivery(outcome="rejected", reason="missing Stripe-Signature header",
                            address="127.0.0.1")

    context = browser.new_context(http_credentials={"username": "admin",
                                                    "password": ADMIN_PASSWORD},
                                  viewport={"width": 420, "height": 900})
    page = context.new_page()
    page.goto(service.url + "/admin/")
    page.get_by_role("link", name="Webhooks").click()
    page.wait_for_url("**/admin/webhooks/")
    assert page.get_by_role("heading", name="Received webhooks").is_visible()
    assert page.locator("#webhooks .outcome-rejected").count() >= 1
    assert "missing Stripe-Signature header" in page.locator("#webhooks").inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= 420
    shot(page, "admin-webhooks")
    page.get_by_label("search").fill(evt["id"])
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(f"**q={evt['id']}**")
    rows = page.locator("#webhooks tr").filter(has_text=evt["id"])
    assert rows.count() >= 1 and "processed" in rows.first.inner_text()
    rows.first.get_by_role("button", name="Replay").click()
    page.wait_for_url("**/admin/events/*/**")
    assert "replay queued as job" in page.locator(".flash").inner_text()
    page.wait_for_selector("#event-state:text('processed')", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 420
    shot(page, "admin-event")

    page.get_by_role("link", name="Audit", exact=True).click()
    page.wait_for_url("**/admin/audit/")
    row = page.locator("#audit tr").filter(has_text="replay").first
    assert "admin" in row.inner_text() and "127.0.0.1" in row.inner_text()
    assert evt["id"] in row.inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= 420
    shot(page, "admin-audit")
    context.close()
    with db_session:
        entry = AuditEntry.select(lambda a: a.action == "replay").first()
        assert (entry.actor, entry.address) == ("admin", "127.0.0.1")
