"""Signed checkout in, live store out: on real Docker, nginx and SMTP."""

from __future__ import annotations

import email
import re
import statistics
import time
from email import policy
from pathlib import Path

from pony.orm import db_session, select

from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars, of_instance
from provisioner.models import AnsibleRun, Instance, Job, StripeEvent
from provisioner.testing import stripe_events
from tests.conftest import PORT_BASE
from tests.integration.conftest import https_request, inspect, wait_until_live


def test_paid_checkout_becomes_a_healthy_store_with_one_welcome_email(service):
    sent_before = len(service.smtp.messages)
    evts = stripe_events.signup(subdomain="janes-shop", site_name="Jane's Shop",
                                email="jane@example.com")
    started = time.perf_counter()
    for evt in evts:
        assert service.post_event(evt) == {"received": True, "duplicate": False}
    wait_until_live("janes-shop")
    elapsed = time.perf_counter() - started
    print(f"\nwebhook -> healthy store with email: {elapsed:.2f} s; webhook answered in "
          f"{statistics.median(service.webhook_times) * 1000:.1f} ms (median)")

    # The container: right env, loopback-only port, restart policy, our labels.
    container = inspect("ebuilder_janes-shop")
    env = dict(item.split("=", 1) for item in container["Config"]["Env"])
    assert env["SITE_NAME"] == "Jane's Shop"
    assert env["ADMIN_EMAIL"] == "jane@example.com"
    assert env["ALLOWED_HOSTS"].split(",")[0] == "janes-shop.stores.test"
    assert "*" not in env["ALLOWED_HOSTS"]
    assert len(env["SECRET_KEY"]) >= 40
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        port = instance.port
        assert instance.admin_password is None, "temporary password kept after the email"
    bindings = container["HostConfig"]["PortBindings"]["8000/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
    assert container["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert container["State"]["Running"]
    mounts = {m["Destination"] for m in container["Mounts"]}
    assert {"/app/db", "/app/media", "/app/logs"} <= mounts

    # Through nginx, with its Host header, over TLS with the wildcard cert.
    status, body = https_request(service.nginx, "janes-shop.stores.test", "/health/")
    assert (status, body.strip()) == (200, b"ok")

    # Exactly one email, whose login details work on the store.
    assert len(service.smtp.messages) == sent_before + 1
    message = email.message_from_bytes(service.smtp.messages[-1], policy=policy.default)
    assert message["To"] == "jane@example.com"
    text = message.get_body(("plain",)).get_content()
    assert "https://janes-shop.stores.test:" in text
    password = re.search(r"Temporary password: (\S+)", text).group(1)
    form = f"email=jane%40example.com&password={password}".encode()
    status, body = https_request(service.nginx, "janes-shop.stores.test", "/cgi-bin/login",
                                 method="POST", body=form)
    assert (status, body.strip()) == (200, b"welcome")
    status, _ = https_request(service.nginx, "janes-shop.stores.test", "/cgi-bin/login",
                              method="POST", body=b"email=jane%40example.com&password=wrong")
    assert status == 403

    # Replaying every event changes nothing.
    with db_session:
        jobs_before = Job.select().count()
    for evt in evts:
        assert service.post_event(evt)["duplicate"] is True
    ids = [evt["id"] for evt in evts]
    with db_session:
        assert Job.select().count() == jobs_before
        assert select(e for e in StripeEvent if e.stripe_id in ids).count() == 2
    again = inspect("ebuilder_janes-shop")
    assert again["Id"] == container["Id"]
    assert again["State"]["StartedAt"] == container["State"]["StartedAt"]
    assert len(service.smtp.messages) == sent_before + 1

    # Secrets never reach the artifacts or the provisioning log.
    secret_key = env["SECRET_KEY"]
    with db_session:
        runs = select(r for r in AnsibleRun)[:]
        assert runs and all(r.status == "successful" for r in runs)
        artifact_dirs = [r.artifact_dir for r in runs]
        log_text = "\n".join(e.message for e in Instance.get(subdomain="janes-shop").logs)
    assert "Ensure the store's container is started" in log_text
    for directory in artifact_dirs:
        for path in Path(directory).rglob("*"):
            if path.is_file():
                content = path.read_text(errors="replace")
                assert password not in content, path
                assert secret_key not in content, path
        assert not (Path(directory).parents[1] / "env" / "extravars").exists()
    assert password not in log_text and secret_key not in log_text


def test_second_playbook_run_changes_nothing(service):
    for evt in stripe_events.signup(subdomain="steady-shop", site_name="Steady",
                                    email="s@example.com"):
        service.post_event(evt)
    wait_until_live("steady-shop")
    started_at = inspect("ebuilder_steady-shop")["State"]["StartedAt"]
    with db_session:
        stores = [of_instance(service.config, Instance.get(subdomain="steady-shop"))]
    result = operations.run(service.config, Operation.PROVISION, stores)
    assert result.status == "successful"
    assert result.hosts["steady-shop"].ok
    assert result.hosts["steady-shop"].changed == 0
    assert inspect("ebuilder_steady-shop")["State"]["StartedAt"] == started_at


def test_one_bad_vhost_in_a_batch_fails_only_its_store(service):
    """Each vhost is validated alone before it lands; nginx is tested and reloaded once."""
    batch = [StoreVars(name=name, instance_id=f"batch-{n}", site_name=name,
                       admin_email=f"{name}@example.com", port=PORT_BASE + 90 + n,
                       docker_host="localhost", upload_limit=limit)
             for n, (name, limit) in enumerate([("good-a", "100m"), ("bad-b", "not-a-size"),
                                                ("good-c", None)])]
    result = operations.run(service.config, Operation.PROVISION, batch,
                            secrets={s.name: {"admin_password": "first-boot-pw"} for s in batch})
    assert result.hosts["good-a"].ok and result.hosts["good-c"].ok
    assert not result.hosts["bad-b"].ok
    assert "nginx rejected the vhost for bad-b.stores.test" in result.hosts["bad-b"].error
    assert "client_max_body_size" in result.hosts["bad-b"].error
    assert not (service.nginx.sites / "bad-b.stores.test.conf").exists()
    for name in ("good-a", "good-c"):
        assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200
    assert service.nginx.running()
    # One test of the whole configuration and one reload for the nginx host.
    with db_session:
        run = AnsibleRun[result.run_id]
        tasks = [e.task for e in run.logs if e.task and e.outcome != "skipped"]
    assert tasks.count("Test the whole nginx configuration.") == 1
    assert tasks.count("Reload nginx.") == 1


def test_webhook_rejects_bad_signature_over_http(service):
    import urllib.error
    import urllib.request

    evt = stripe_events.signup(subdomain="nope-shop", site_name="N", email="n@example.com")[0]
    request = urllib.request.Request(
        service.url + "/api/webhook/stripe/", data=stripe_events.encode(evt), method="POST",
        headers={"Stripe-Signature": "t=1,v1=deadbeef"})
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("accepted a bad signature")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert "signature" in exc.read().decode()
    with db_session:
        assert StripeEvent.get(stripe_id=evt["id"]) is None
