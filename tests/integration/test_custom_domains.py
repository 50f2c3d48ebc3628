"""A customer's own domain end to end, against Pebble (a real ACME server) with the test
stack's nginx and a real store container: DNS checked, certificate issued by HTTP-01
through our nginx, served over TLS with Pebble's chain, in the container's ALLOWED_HOSTS
with its data kept, renewed, and removed again."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from bottle import Bottle
from cheroot import wsgi
from cryptography import x509
from pony.orm import db_session

from provisioner import certificates, domains, jobs, settings
from provisioner.ansible import runner
from provisioner.models import AuditEntry, CustomDomain, Instance, Job, utcnow
from provisioner.states import JobKind
from provisioner.testing.stack import free_port, wait_for_port
from provisioner.web import domains as web_domains
from provisioner.web.common import Web
from provisioner.worker import Worker
from tests.integration.conftest import ADMIN_PASSWORD, https_request, inspect
from tests.integration.pebble import pebble  # noqa: F401 (the fixture)
from tests.integration.test_operations import provision

NAME = "shop.customer.test"


@pytest.fixture
def acme_config(live_config, pebble, monkeypatch):  # noqa: F811 (the fixture)
    """The live service's settings pointed at Pebble and its DNS, with the challenge route
    served over HTTP by the very code `serve` runs (web/domains.py)."""
    port = free_port()
    config = dataclasses.replace(
        live_config, acme_directory_url=pebble.directory_url,
        acme_ca_bundle=str(pebble.ca_bundle),
        dns_server=settings.dns_server("DNS_SERVER", pebble.dns_server),
        acme_challenge_upstream=f"http://127.0.0.1:{port}")
    app, web = Bottle(), Web(config)
    for route in web_domains.ROUTES:
        app.route(route.path, route.method, web.bind(route))
    server = wsgi.Server(("127.0.0.1", port), app, numthreads=2)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    wait_for_port(port)
    # Until the service passes it to every run (runner.settings_vars), this test does.
    if "nginx_site_acme_challenge_upstream" not in runner.settings_vars(config):
        wrapped = runner.settings_vars
        monkeypatch.setattr(runner, "settings_vars", lambda c: {
            **wrapped(c), "nginx_site_acme_challenge_upstream": config.acme_challenge_upstream})
    yield config
    server.stop()


def api(config, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        config.acme_challenge_upstream + path, method=method,
        data=json.dumps(body or {}).encode() if method == "POST" else None,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def run_domain_jobs(config) -> list[str]:
    """The worker's own handling (claim, run with no transaction open, record) of every
    DOMAIN job due now, until none is; the log lines they left."""
    worker, lines = Worker(config), []
    while True:
        with db_session:
            claimed = jobs.claim_due(kinds=[JobKind.DOMAIN])
        if not claimed:
            return lines
        for job_id in claimed:
            worker._care(job_id, domains.run_job)
            with db_session:
                job = Job[job_id]
                assert job.state == "done", f"domain job failed: {job.last_error}"
                lines.extend(e.message for e in job.logs)


def domain_row(domain_id: int) -> SimpleNamespace:
    with db_session:
        return SimpleNamespace(**CustomDomain[domain_id].to_dict(with_lazy=True))


def served_certificate(nginx, issuers: str, path: str = "/media/page.txt"):
    """GET `path` over TLS as NAME, verifying the chain against Pebble's issuers only."""
    context = ssl.create_default_context(cadata=issuers)
    with socket.create_connection(("127.0.0.1", nginx.https_port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=NAME) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return answer, leaf


def allowed_hosts(container: str) -> list[str]:
    env = dict(e.split("=", 1) for e in inspect(container)["Config"]["Env"])
    return env["ALLOWED_HOSTS"].split(",")


def test_issue_serve_renew_and_remove_a_customers_domain(service, acme_config, pebble):  # noqa: F811
    started = time.monotonic()
    provision(service, "dom-shop")
    with db_session:
        store = Instance.get(subdomain="dom-shop", live=True)
        store_id = store.id
    page = acme_config.customer_data_root / str(store_id) / "media" / "page.txt"
    page.write_text("kept through it all\n")
    service.paused.set()  # this test runs the DOMAIN jobs itself, with Pebble's settings
    try:
        # Added through the admin API, audited; DNS points elsewhere at first.
        pebble.set_a(NAME, ["192.0.2.7"])
        status, added = api(acme_config, "POST", f"/api/instances/{store_id}/domains/",
                            {"name": "Shop.Customer.Test."})
        assert status == 202, added
        domain_id = added["domain"]["id"]
        assert added["domain"]["name"] == NAME
        assert added["domain"]["dns_record"]["text"] == f"{NAME}. CNAME dom-shop.stores.test."
        lines = run_domain_jobs(acme_config)
        pending = domain_row(domain_id)
        assert pending.status == "dns_pending" and pending.checked_at is not None
        assert "192.0.2.7" in pending.last_error, pending.last_error
        assert any("DNS not ready" in line for line in lines), lines
        with db_session:  # looked at again later, not now: no retry burnt
            [later] = Job.select(lambda j: j.kind == "domain" and j.state == "queued")[:]
            assert later.next_run_at > utcnow() + timedelta(minutes=5)
            assert later.attempts == 0

        # The record is right now; "check now" does it at once.
        pebble.clear_a(NAME)
        status, _ = api(acme_config, "POST",
                        f"/api/instances/{store_id}/domains/{domain_id}/check/")
        assert status == 202
        issue_started = time.monotonic()
        run_domain_jobs(acme_config)
        issue_took = time.monotonic() - issue_started
        live = domain_row(domain_id)
        assert live.status == "live", live.last_error
        cert_path, key_path = Path(live.cert_path), Path(live.key_path)
        assert oct(key_path.stat().st_mode & 0o777) == "0o600"
        assert oct(cert_path.parent.stat().st_mode & 0o777) == "0o700"
        first = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert live.expires_at == first.not_valid_after_utc.replace(tzinfo=None)

        # Served over TLS for the name, with the chain Pebble issued (verified against
        # Pebble's own root and intermediate), by the store itself, data intact.
        issuers = pebble.issuer_pems()
        answer, leaf = served_certificate(service.nginx, issuers)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"kept through it all\n")
        assert leaf.serial_number == first.serial_number
        assert NAME in allowed_hosts("ebuilder_dom-shop")
        assert page.read_text() == "kept through it all\n"
        # The store's own name still works.
        assert https_request(service.nginx, "dom-shop.stores.test", "/media/page.txt") == \
            (200, b"kept through it all\n")
        # Nothing secret in what admins see of it.
        status, listed = api(acme_config, "GET", f"/api/instances/{store_id}/domains/")
        assert status == 200 and listed["items"][0]["status"] == "live"
        assert "PRIVATE KEY" not in json.dumps(listed)

        # Renewal: within ACME_RENEW_DAYS of expiry, the schedule queues it.
        with db_session:
            CustomDomain[domain_id].expires_at = utcnow() + timedelta(days=5)
        assert domains.renew_due(acme_config) == 1
        renew_started = time.monotonic()
        run_domain_jobs(acme_config)
        renew_took = time.monotonic() - renew_started
        renewed = domain_row(domain_id)
        assert renewed.status == "live" and renewed.cert_path != str(cert_path)
        second = x509.load_pem_x509_certificate(Path(renewed.cert_path).read_bytes())
        assert second.serial_number != first.serial_number
        answer, leaf = served_certificate(service.nginx, issuers)
        assert answer.endswith(b"kept through it all\n")
        assert leaf.serial_number == second.serial_number
        assert not cert_path.exists() and not key_path.exists()  # the old pair is gone
        assert domains.renew_due(acme_config) == 0

        # Removal: vhost, certificates (ours and nginx's copies), ALLOWED_HOSTS.
        status, _ = api(acme_config, "POST",
                        f"/api/instances/{store_id}/domains/{domain_id}/remove/")
        assert status == 202
        remove_started = time.monotonic()
        run_domain_jobs(acme_config)
        remove_took = time.monotonic() - remove_started
        gone = domain_row(domain_id)
        assert gone.status == "removed" and gone.removed_at is not None
        assert not (certificates.certificates_dir(acme_config) / NAME).exists()
        copies = service.nginx.sites.parent / "ebuilder-certificates" / "dom-shop"
        assert not copies.exists() or not any(copies.iterdir())
        vhost = (service.nginx.sites / "dom-shop.stores.test.conf").read_text()
        assert NAME not in vhost
        assert NAME not in allowed_hosts("ebuilder_dom-shop")
        with pytest.raises(ssl.SSLError):  # no certificate for the name any more
            served_certificate(service.nginx, issuers)
        assert page.read_text() == "kept through it all\n"
        assert https_request(service.nginx, "dom-shop.stores.test", "/media/page.txt") == \
            (200, b"kept through it all\n")
        with db_session:
            actions = [a.action for a in AuditEntry.select(
                lambda a: a.target == f"instance:{store_id}")]
        assert {"domain_add", "domain_check", "domain_remove"} <= set(actions)
    finally:
        service.paused.clear()
    print(f"\ncustom domain: issue {issue_took:.1f} s, renew {renew_took:.1f} s, "
          f"remove {remove_took:.1f} s, whole test {time.monotonic() - started:.1f} s")
