"""The admin API through the real app: auth, throttling, 404s, bad input, the data."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from pony.orm import db_session

from provisioner.models import AnsibleRun, HealthCheck, Instance, Job
from provisioner.testing import stripe_events
from provisioner.web import create_app
from tests.conftest import apply_events
from tests.wsgi import basic, call

PASSWORD = "admin-pass-123"
TOKEN = "admin-token-abcdefghijklmnop"
AUTH = basic("admin", PASSWORD)


@pytest.fixture
def admin_config(config):
    return dataclasses.replace(config, admin_password=PASSWORD, admin_token=TOKEN)


@pytest.fixture
def app(admin_config):
    return create_app(admin_config)


@pytest.fixture
def stores(admin_config):
    for n, name in enumerate(["alpha-shop", "beta-shop", "gamma-store"]):
        apply_events(admin_config, stripe_events.signup(
            subdomain=name, site_name=name.title(), email=f"owner{n}@example.com"))
    with db_session:
        Instance.get(subdomain="gamma-store").status = "failed"
        return {i.subdomain: i.id for i in Instance.select()}


ADMIN_GETS = ["/api/instances/", "/api/instances/1/", "/api/instances/1/health/",
              "/api/instances/1/stats/", "/api/customers/", "/api/stats/", "/api/jobs/1/",
              "/api/runs/1/", "/metrics", "/api/webhooks/", "/api/events/1/", "/api/audit/",
              "/api/instances/1/backups/"]
ADMIN_POSTS = ["/api/instances/1/start/", "/api/instances/1/stop/", "/api/instances/1/restart/",
               "/api/instances/1/retry/", "/api/events/1/replay/", "/api/instances/1/backups/",
               "/api/instances/1/restore/", "/api/instances/1/clone/"]


@pytest.mark.parametrize("path", ADMIN_GETS + ADMIN_POSTS)
@pytest.mark.parametrize("headers", [{}, basic("admin", "wrong"), basic("root", PASSWORD),
                                     {"Authorization": "Bearer nope"},
                                     {"Authorization": "Basic !!!"}])
def test_every_admin_route_needs_credentials(app, path, headers):
    method = "POST" if path in ADMIN_POSTS else "GET"
    status, body = call(app, method, path, headers=headers)
    assert status == 401 and body["error"] == "admin credentials required"


def test_bearer_token_works(app, stores):
    status, body = call(app, "GET", "/api/instances/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["total"] == 3


def test_repeated_failures_are_throttled(app):
    for _ in range(5):
        assert call(app, "GET", "/api/stats/", headers=basic("admin", "guess"))[0] == 401
    status, _, headers = call(app, "GET", "/api/stats/", headers=AUTH, raw=True)
    assert status == 429 and int(headers["Retry-After"]) > 0


def test_without_configured_credentials_nobody_gets_in(config):
    app = create_app(dataclasses.replace(config, admin_password="", admin_token=""))
    assert call(app, "GET", "/api/stats/", headers=basic("admin", ""))[0] == 401


@pytest.mark.parametrize("path", ["/api/instances/999/", "/api/instances/999/health/",
                                  "/api/instances/999/stats/", "/api/jobs/999/",
                                  "/api/runs/999/", "/api/events/999/"])
def test_unknown_ids_are_404(app, path):
    status, body = call(app, "GET", path, headers=AUTH)
    assert status == 404 and "999" in body["error"]


@pytest.mark.parametrize("action", ["start", "stop", "restart", "retry"])
def test_action_on_unknown_store_is_404(app, action):
    assert call(app, "POST", f"/api/instances/999/{action}/", headers=AUTH)[0] == 404


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_action_on_a_store_never_built_is_409(app, stores, action):
    status, body = call(app, "POST", f"/api/instances/{stores['alpha-shop']}/{action}/",
                        headers=AUTH)
    assert status == 409 and "no container" in body["error"]


def test_action_queues_a_job_and_answers_202(app, stores):
    with db_session:
        Instance[stores["alpha-shop"]].provisioned_at = Instance[stores["alpha-shop"]].created_at
    status, body = call(app, "POST", f"/api/instances/{stores['alpha-shop']}/stop/", headers=AUTH)
    assert status == 202
    with db_session:
        job = Job[body["job_id"]]
        assert (job.kind, job.detail, job.state) == ("action", "stop", "queued")
    status, detail = call(app, "GET", body["status_url"], headers=AUTH)
    assert status == 200 and detail["state"] == "queued"


@pytest.mark.parametrize("query, reason", [("status=bogus", "status must be one of"),
                                          ("page=0", "page"), ("per_page=1000", "per_page"),
                                          ("page=x", "integers")])
def test_bad_list_arguments_are_400(app, query, reason):
    status, body = call(app, "GET", "/api/instances/", headers=AUTH, query=query)
    assert status == 400 and reason in body["error"]


def test_list_filters_searches_and_pages(app, stores):
    _, body = call(app, "GET", "/api/instances/", headers=AUTH, query="status=failed")
    assert [i["subdomain"] for i in body["items"]] == ["gamma-store"]
    _, body = call(app, "GET", "/api/instances/", headers=AUTH, query="q=SHOP")
    assert sorted(i["subdomain"] for i in body["items"]) == ["alpha-shop", "beta-shop"]
    _, body = call(app, "GET", "/api/instances/", headers=AUTH, query="q=owner1@")
    assert [i["subdomain"] for i in body["items"]] == ["beta-shop"]
    _, body = call(app, "GET", "/api/instances/", headers=AUTH, query="per_page=2&page=2")
    assert body["total"] == 3 and len(body["items"]) == 1


def test_instance_detail_has_jobs_and_log_and_no_password(app, stores):
    status, body = call(app, "GET", f"/api/instances/{stores['beta-shop']}/", headers=AUTH)
    assert status == 200
    assert body["subdomain"] == "beta-shop" and body["desired_state"] == "running"
    assert body["jobs"][0]["kind"] == "converge"
    assert any("checkout" in e["message"] for e in body["log"])
    with db_session:
        password = Instance[stores["beta-shop"]].admin_password
    assert password and password not in json.dumps(body)
    assert "admin_password" not in body


def test_customers_and_stats(app, stores):
    _, customers = call(app, "GET", "/api/customers/", headers=AUTH)
    assert customers["total"] == 3
    assert all(c["subscriptions"][0]["stripe_id"].startswith("sub_") for c in customers["items"])
    _, stats = call(app, "GET", "/api/stats/", headers=AUTH)
    assert stats["instances_total"] == 3
    assert stats["instances_by_status"] == {"pending": 2, "failed": 1}
    assert sum(stats["signups_per_day"].values()) == 3
    assert stats["paying_subscriptions"] == 3
    assert stats["monthly_recurring_revenue_pence"] == 3 * 1200


def test_run_detail_redacts_secrets_from_stdout(app, stores, admin_config, tmp_path):
    with db_session:
        instance = Instance[stores["alpha-shop"]]
        password = instance.admin_password
        (tmp_path / "stdout").write_text(f"ok: password={password} key={PASSWORD}\n")
        run = AnsibleRun(ident="provision-x", playbook="provision.yml", status="successful",
                         artifact_dir=str(tmp_path))
        Job(kind="converge", instance=instance, ansible_run=run)
    with db_session:
        run_id = AnsibleRun.get(ident="provision-x").id
    status, body = call(app, "GET", f"/api/runs/{run_id}/", headers=AUTH)
    assert status == 200 and body["stores"] == ["alpha-shop"]
    assert password not in body["stdout"] and PASSWORD not in body["stdout"]
    assert "password=********" in body["stdout"]


def test_metrics(app, stores):
    payload = b"{}"
    call(app, "POST", "/api/webhook/stripe/", body=payload,
         headers={"Stripe-Signature": stripe_events.sign(payload, "whsec_wrong")})
    status, text, headers = call(app, "GET", "/metrics", headers=AUTH, raw=True)
    text = text.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'provisioner_webhooks_total{result="rejected"} 1' in text
    assert 'provisioner_instances{status="pending"} 2' in text
    assert 'provisioner_jobs{kind="converge",state="queued"} 3' in text
    assert "provisioner_webhook_seconds_count 1" in text


def test_public_status_tells_nothing_private(app, stores):
    status, body = call(app, "GET", "/api/status/")
    assert status == 200
    assert (body["stores_total"], body["stores_running"], body["service"]) == (3, 0, "up")
    assert body["last_health_sweep"] is None
    with db_session:
        HealthCheck(instance=stores["alpha-shop"], ok=True)
    assert call(app, "GET", "/api/status/")[1]["last_health_sweep"].endswith("Z")
    assert body["queue_depth"] == 3
    text = json.dumps(body)
    assert "@" not in text and "shop" not in text
    status, html, _ = call(app, "GET", "/status/", raw=True)
    assert status == 200 and b"Stores running" in html and b"@example.com" not in html


def test_openapi_documents_every_api_route(app):
    status, doc = call(app, "GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items()
                  for method in ops if method != "parameters"}
    routed = set()
    for route in app.routes:
        if not route.rule.startswith("/api/"):
            continue
        routed.add((re.sub(r"<\w+:int>", "{id}", route.rule), route.method))
    assert routed - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routed == set(), "documented paths that do not exist"


def test_admin_pages_need_auth_and_render(app, stores):
    status, text, headers = call(app, "GET", "/admin/", raw=True)
    assert status == 401 and headers["Www-Authenticate"].startswith("Basic")
    for n, path in enumerate(["/admin/", "/admin/instances/",
                              f"/admin/instances/{stores['alpha-shop']}/", "/admin/customers/",
                              "/admin/webhooks/", "/admin/audit/"]):
        status, html, _ = call(app, "GET", path, raw=True, remote_addr=f"10.0.0.{n}")
        assert status == 401, path
        status, html, _ = call(app, "GET", path, headers=AUTH, raw=True)
        assert status == 200 and b'href="/admin/webhooks/"' in html and \
            b'href="/admin/audit/"' in html, path
    for path in ["/admin/", "/admin/instances/", f"/admin/instances/{stores['alpha-shop']}/",
                 "/admin/customers/"]:
        status, html, _ = call(app, "GET", path, headers=AUTH, raw=True)
        assert status == 200 and b"alpha-shop" in html, path


@pytest.mark.parametrize("path", ["/admin/instances/999/", "/admin/runs/999/",
                                  "/admin/events/999/"])
def test_admin_pages_for_unknown_ids_are_404(app, path):
    status, html, _ = call(app, "GET", path, headers=AUTH, raw=True)
    assert status == 404 and b"999" in html


def test_admin_action_form_needs_the_csrf_token(app, stores):
    path = f"/admin/instances/{stores['alpha-shop']}/stop/"
    status, _, _ = call(app, "POST", path, body=b"csrf=forged",
                        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                        raw=True)
    assert status == 403
    with db_session:
        assert Job.select(lambda j: j.kind == "action").count() == 0


def test_admin_suspend_and_unsuspend_from_the_page(app, stores, admin_config):
    import re as regex

    from provisioner.ansible import operations
    from provisioner.worker import Worker

    store = stores["alpha-shop"]
    with db_session:
        instance = Instance[store]
        instance.provisioned_at = instance.created_at
        instance.status = "running"
        Job.select().delete(bulk=True)
    _, html, _ = call(app, "GET", f"/admin/instances/{store}/", headers=AUTH, raw=True)
    token = regex.search(rb'name="csrf" value="([0-9a-f]+)"', html).group(1).decode()
    assert b"Health history" in html and b'id="suspend-button"' in html
    runner = operations.BACKEND  # the recorder tests/conftest.py puts there
    for action, playbook, status, hold in (("suspend", "suspend.yml", "suspended", True),
                                           ("unsuspend", "provision.yml", "running", False)):
        status_code, _, headers = call(
            app, "POST", f"/admin/instances/{store}/{action}/", body=f"csrf={token}".encode(),
            headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, raw=True)
        assert status_code == 303 and "queued" in headers["Location"]
        Worker(admin_config).run_once()
        assert runner.runs[-1][0] == playbook
        with db_session:
            assert (Instance[store].status, Instance[store].admin_hold) == (status, hold)
    status_code, html, _ = call(app, "GET", "/admin/runs/", headers=AUTH, raw=True)
    assert status_code == 200 and b"Provisioning runs" in html
