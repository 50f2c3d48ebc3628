"""Customers' own domains: what a name may be, the DNS record and its verdict, the
steps of a domain (DNS, certificate, renewal, removal) with stand-ins for DNS and the
ACME server (tests/integration/test_custom_domains.py has the real ones), the admin API
and page forms, the customer's page, and the ACME challenge answers."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
from bottle import Bottle
from pony.orm import db_session

from provisioner import certificates, domains
from provisioner.models import (
    AlertIncident,
    AuditEntry,
    CustomDomain,
    Customer,
    Instance,
    Job,
    utcnow,
)
from provisioner.web import account as web_account
from provisioner.web import domains as web_domains
from provisioner.web.common import Web
from provisioner.worker import Worker
from tests.test_accounts import link_for
from tests.test_admin_api import AUTH, PASSWORD
from tests.test_health_history import running_store
from tests.wsgi import call

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def dconfig(config, tmp_path):
    return dataclasses.replace(config, admin_password=PASSWORD, data_dir=tmp_path / "data")


# -- names ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, name", [
    ("shop.example.com", "shop.example.com"), ("  Shop.Example.COM. ", "shop.example.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"), ("a-b.c-d.co.uk", "a-b.c-d.co.uk")])
def test_a_domain_is_lower_cased_and_kept(config, raw, name):
    assert domains.normalize(config, raw) == name


@pytest.mark.parametrize("raw, reason", [
    ("*.example.com", "wildcard"), ("127.0.0.1", "IP address"), ("[::1]", "IP address"),
    ("2001:db8::1", "IP address"), ("shop", "not a valid"), ("shop..example.com", "not a valid"),
    ("-shop.example.com", "not a valid"), ("shop_1.example.com", "not a valid"),
    ("shop.example.com/x", "not a valid"), ("shop.example.com\n.evil", "not a valid"),
    ("a.stores.test", "are ours"), ("stores.test", "are ours"), ("x.localhost", "localhost"),
    ("1.2.3.4.5", "number"), ("a" * 64 + ".com", "not a valid"), ("a." * 130 + "com", "253"),
    ("", "give a domain"), (None, "give a domain"), (["x.com"], "give a domain"),
    ("shop.example.com; include /etc/passwd", "not a valid")])
def test_what_is_not_a_customers_domain_is_refused_with_the_reason(config, raw, reason):
    with pytest.raises(domains.Refused, match=reason):
        domains.normalize(config, raw)


def test_the_dns_record_to_create(config):
    store = SimpleNamespace(subdomain="jane")
    record = domains.dns_record(config, store, "shop.example.com")
    assert record["text"] == "shop.example.com. CNAME jane.stores.test."
    assert not record["apex_note"] and domains.dns_record(config, store, "example.com")["apex_note"]
    fixed = dataclasses.replace(config, custom_domain_target="203.0.113.7, 2001:db8::7")
    assert domains.dns_record(fixed, store, "example.com")["text"] == \
        "example.com. A 203.0.113.7\nexample.com. AAAA 2001:db8::7"
    edge = dataclasses.replace(config, custom_domain_target="edge.example.net")
    assert domains.dns_record(edge, store, "a.b.com")["text"] == "a.b.com. CNAME edge.example.net."


def test_the_dns_verdict():
    ours = {"203.0.113.7"}
    assert domains.dns_verdict("a.com", {"203.0.113.7"}, ours) == ""
    assert "no A/AAAA record" in domains.dns_verdict("a.com", set(), ours)
    assert "198.51.100.1" in domains.dns_verdict("a.com", {"203.0.113.7", "198.51.100.1"}, ours)
    assert "no address" in domains.dns_verdict("a.com", {"203.0.113.7"}, set())


def test_a_fixed_target_is_checked_without_asking_dns_for_it(config, monkeypatch):
    fixed = dataclasses.replace(config, custom_domain_target="203.0.113.7")
    asked = []
    monkeypatch.setattr(domains, "resolve", lambda c, name: asked.append(name) or {"203.0.113.7"})
    assert domains.check_dns(fixed, "a.com", "jane") == "" and asked == ["a.com"]


# -- steps ---------------------------------------------------------------------------

class FakeCA:
    """Stands in for the ACME server: writes a real certificate pair where issue would."""

    def __init__(self, config, fail: str = ""):
        self.config, self.fail, self.issued = config, fail, []

    def __call__(self, config, name):
        if self.fail:
            raise certificates.IssueFailed(self.fail)
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = utcnow()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + timedelta(days=90))
                .sign(key, hashes.SHA256()))
        issued = certificates._store(
            config, name, cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
        self.issued.append(issued)
        return issued


def store_with_domain(config, name="shop.example.com", subdomain="lambda"):
    store = running_store(config, subdomain)
    with db_session:
        domain, job = domains.add(config, Instance[store], name)
        return store, domain.id


def run_domain_jobs(config) -> list[str]:
    lines = []
    worker = Worker(config)
    from provisioner import jobs
    for _ in range(10):
        with db_session:
            claimed = jobs.claim_due(kinds=["domain"])
        if not claimed:
            break
        for job_id in claimed:
            worker._care(job_id, domains.run_job)
            with db_session:
                lines += [e.message for e in Job[job_id].logs] + [Job[job_id].last_error or ""]
    return lines


def row(domain_id) -> dict:
    with db_session:
        return CustomDomain[domain_id].to_dict(with_lazy=True)


def test_dns_not_ready_waits_without_burning_retries(dconfig, monkeypatch):
    store, domain_id = store_with_domain(dconfig)
    monkeypatch.setattr(domains, "resolve", lambda c, n: {"198.51.100.9"} if n.startswith(
        "shop") else {"203.0.113.7"})
    lines = run_domain_jobs(dconfig)
    assert any("DNS not ready" in line for line in lines)
    d = row(domain_id)
    assert d["status"] == "dns_pending" and "198.51.100.9" in d["last_error"]
    with db_session:
        [later] = Job.select(lambda j: j.kind == "domain" and j.state == "queued")[:]
        assert later.attempts == 0 and later.next_run_at > utcnow() + timedelta(minutes=9)
        CustomDomain[domain_id].created_at = utcnow() - timedelta(days=8)
        later.next_run_at = utcnow()
    run_domain_jobs(dconfig)
    assert row(domain_id)["status"] == "failed"


def test_issue_renew_and_remove_converge_the_store(dconfig, monkeypatch, recorded_runs):
    store, domain_id = store_with_domain(dconfig)
    monkeypatch.setattr(domains, "resolve", lambda c, n: {"203.0.113.7"})
    ca = FakeCA(dconfig)
    monkeypatch.setattr(certificates, "issue", ca)
    recorded_runs.runs.clear()
    run_domain_jobs(dconfig)
    d = row(domain_id)
    assert d["status"] == "live" and d["cert_path"] == ca.issued[0].cert_path
    # Its HTTP server (no certificate yet) before the order, its HTTPS one after.
    assert [list(r[1][0]["custom_domains"]) for r in recorded_runs.runs] == [
        [{"name": "shop.example.com", "cert": "", "key": ""}],
        [{"name": "shop.example.com", "cert": d["cert_path"], "key": d["key_path"]}]]
    assert {r[0] for r in recorded_runs.runs} == {"provision.yml"}

    with db_session:
        CustomDomain[domain_id].expires_at = utcnow() + timedelta(days=10)
    assert domains.renew_due(dconfig) == 1
    ca.fail = "urn:ietf:params:acme:error:connection: refused"
    run_domain_jobs(dconfig)  # retried (no backoff in tests) until the job gives up
    with db_session:
        [alert] = AlertIncident.select(lambda a: a.kind == "cert_renewal_failed")[:]
        assert alert.resolved_at is None and "shop.example.com" in alert.summary
        assert CustomDomain[domain_id].status == "live"  # the old certificate still serves
    ca.fail = ""
    assert domains.renew_due(dconfig) == 1  # the next day's schedule
    run_domain_jobs(dconfig)
    renewed = row(domain_id)
    assert renewed["cert_path"] == ca.issued[1].cert_path and renewed["last_error"] is None
    assert not (dconfig.data_dir / d["cert_path"]).exists()  # the old pair is gone
    with db_session:
        assert AlertIncident.select(lambda a: a.kind == "cert_renewal_failed").first() \
            .resolved_at is not None

    recorded_runs.runs.clear()
    with db_session:
        domains.remove(Instance[store], domain_id)
    run_domain_jobs(dconfig)
    gone = row(domain_id)
    assert gone["status"] == "removed" and gone["cert_path"] is None
    assert "custom_domains" not in recorded_runs.runs[0][1][0]
    assert not (certificates.certificates_dir(dconfig) / "shop.example.com").exists()
    with db_session:  # the name is free again
        domains.add(dconfig, Instance[store], "shop.example.com")


def test_a_first_issue_failing_for_good_marks_the_domain_failed(dconfig, monkeypatch):
    config = dataclasses.replace(dconfig, job_max_attempts=2)
    store, domain_id = store_with_domain(config)
    monkeypatch.setattr(domains, "resolve", lambda c, n: {"203.0.113.7"})
    monkeypatch.setattr(certificates, "issue", FakeCA(config, fail="rejected: CAA forbids"))
    run_domain_jobs(config)
    d = row(domain_id)
    assert d["status"] == "failed" and "CAA" in d["last_error"]
    with db_session:  # "check again" starts over
        domains.recheck(Instance[store], domain_id)
        assert CustomDomain[domain_id].status == "dns_pending"


def test_a_store_that_does_not_run_keeps_its_domain_waiting(dconfig, monkeypatch):
    store, domain_id = store_with_domain(dconfig)
    monkeypatch.setattr(domains, "resolve", lambda c, n: {"203.0.113.7"})
    with db_session:
        Instance[store].status = "stopped"
    lines = run_domain_jobs(dconfig)
    assert any("waiting for the store" in line for line in lines)
    assert row(domain_id)["status"] == "issuing"


def test_the_end_of_a_store_removes_its_domains_and_certificates(dconfig, monkeypatch):
    store, domain_id = store_with_domain(dconfig)
    issued = FakeCA(dconfig)(dconfig, "shop.example.com")
    with db_session:
        domain = CustomDomain[domain_id]
        domain.cert_path, domain.key_path, domain.status = issued.cert_path, issued.key_path, "live"
        assert domains.for_store(Instance[store])[0]["cert"] == issued.cert_path
        assert domains.store_ended(dconfig, Instance[store]) == 1
        assert domains.for_store(Instance[store]) == []
    assert row(domain_id)["status"] == "removed"
    assert not (certificates.certificates_dir(dconfig) / "shop.example.com").exists()


def test_a_name_is_one_stores_only(dconfig):
    first = running_store(dconfig, "mu-shop")
    second = running_store(dconfig, "nu-shop")
    with db_session:
        domains.add(dconfig, Instance[first], "shop.example.com")
        with pytest.raises(domains.Refused, match="another store"):
            domains.add(dconfig, Instance[second], "SHOP.example.com")
        with pytest.raises(domains.Refused, match="this store"):
            domains.add(dconfig, Instance[first], "shop.example.com")


# -- web -----------------------------------------------------------------------------

@pytest.fixture
def web_app(dconfig):
    """Our routes and the customer's page on one Web (one CSRF key), as create_app binds."""
    app, web = Bottle(), Web(dconfig)
    for route in (*web_domains.ROUTES, *web_account.ROUTES):
        app.route(route.path, route.method, web.bind(route))
    return app, web


def test_the_api_adds_lists_refuses_and_audits(web_app, dconfig):
    app, _ = web_app
    store = running_store(dconfig, "xi-shop")
    status, body = call(app, "POST", f"/api/instances/{store}/domains/",
                        {"name": "Shop.Example.com"}, headers=AUTH)
    assert status == 202 and body["domain"]["status"] == "dns_pending"
    assert body["status_url"] == f"/api/jobs/{body['job_id']}/"
    status, listed = call(app, "GET", f"/api/instances/{store}/domains/", headers=AUTH)
    assert status == 200 and [d["name"] for d in listed["items"]] == ["shop.example.com"]
    assert listed["items"][0]["dns_record"]["text"] == \
        "shop.example.com. CNAME xi-shop.stores.test."
    status, body = call(app, "POST", f"/api/instances/{store}/domains/", {"name": "*.evil.com"},
                        headers=AUTH)
    assert status == 409 and "wildcard" in body["error"]
    assert call(app, "POST", f"/api/instances/{store}/domains/", {}, headers=AUTH)[0] == 400
    assert call(app, "POST", "/api/instances/999/domains/", {"name": "a.com"},
                headers=AUTH)[0] == 404
    assert call(app, "POST", f"/api/instances/{store}/domains/", {"name": "a.com"})[0] == 401
    assert call(app, "POST", f"/api/instances/{store}/domains/", b"name=a.com",
                headers={**AUTH, "Content-Type": FORM})[0] == 415
    domain_id = listed["items"][0]["id"]
    assert call(app, "POST", f"/api/instances/{store}/domains/{domain_id}/remove/", {},
                headers=AUTH)[0] == 202
    assert call(app, "POST", f"/api/instances/{store}/domains/{domain_id + 50}/remove/", {},
                headers=AUTH)[0] == 409
    with db_session:
        audited = [(a.action, a.detail) for a in AuditEntry.select().order_by(AuditEntry.id)]
    assert [a for a, _ in audited] == ["domain_add", "domain_add", "domain_remove",
                                       "domain_remove"]
    assert audited[1][1].startswith("refused: *.evil.com")


def test_the_store_page_forms_need_the_csrf_token(web_app, dconfig):
    app, web = web_app
    store = running_store(dconfig, "omicron")
    headers = {**AUTH, "Content-Type": FORM}
    status, _, _ = call(app, "POST", f"/admin/instances/{store}/domains/",
                        b"name=shop.example.com", headers=headers, raw=True)
    assert status == 403
    with db_session:
        assert not CustomDomain.select().exists()
    form = urlencode({"csrf": web.csrf_token(), "name": "shop.example.com"}).encode()
    status, _, answer = call(app, "POST", f"/admin/instances/{store}/domains/", form,
                             headers=headers, raw=True)
    assert status == 303 and "queued" in answer["Location"]
    with db_session:
        assert CustomDomain.get(name="shop.example.com").instance.id == store


def test_the_challenge_route_answers_only_tokens_of_an_order(web_app, dconfig):
    app, _ = web_app
    token = "A" * 43
    status, _, _ = call(app, "GET", f"/.well-known/acme-challenge/{token}", raw=True)
    assert status == 404
    path = certificates._private_dir(certificates.challenge_dir(dconfig)) / token
    path.write_text(f"{token}.thumbprint")
    status, body, headers = call(app, "GET", f"/.well-known/acme-challenge/{token}", raw=True)
    assert (status, body) == (200, f"{token}.thumbprint".encode())
    assert headers["Content-Type"] == "text/plain"
    for bad in ("..%2f..%2facme%2faccount-key.pem", "short", "a" * 20 + ".pem"):
        assert call(app, "GET", f"/.well-known/acme-challenge/{bad}", raw=True)[0] == 404
    assert certificates.challenge_answer(dconfig, "../account-key.pem" + "x" * 20) is None


def test_the_account_key_is_made_once_and_private(dconfig):
    first = certificates.account_key(dconfig)
    path = certificates.acme_dir(dconfig) / "account-key.pem"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert certificates.account_key(dconfig).thumbprint() == first.thumbprint()


def test_the_customer_adds_sees_and_removes_a_domain_on_their_page(web_app, dconfig):
    app, web = web_app
    store = running_store(dconfig, "pi-shop")
    with db_session:
        customer_id = Instance[store].customer.id
        other = Customer(email="other@example.com")
        other_store = Instance(subdomain="rho", site_name="R", admin_email="o@example.com",
                               port=19177, customer=other, status="running")
        from pony.orm import flush
        flush()
        other_store_id = other_store.id
    link = link_for(customer_id)
    status, html, _ = call(app, "GET", f"/account/{link}/", raw=True)
    assert status == 200 and b'action="/account/' in html
    token = web_account._form_token(web, link)
    assert token.encode() in html
    headers = {"Content-Type": FORM}
    form = urlencode({"csrf": token, "store": store, "name": "<b>x</b>.example.com"}).encode()
    status, _, answer = call(app, "POST", f"/account/{link}/domains/", form, headers=headers,
                             raw=True)
    assert status == 303 and "not%20a%20valid" in answer["Location"]
    form = urlencode({"csrf": token, "store": store, "name": "shop.example.com"}).encode()
    assert call(app, "POST", f"/account/{link}/domains/", form, headers=headers,
                raw=True)[0] == 303
    status, html, _ = call(app, "GET", f"/account/{link}/", raw=True)
    assert b"shop.example.com. CNAME pi-shop.stores.test." in html
    assert b"waiting for the DNS record" in html
    # Not with another link's token, not on someone else's store, not a forged link.
    other_form = urlencode({"csrf": "0" * 64, "store": store, "name": "b.example.com"}).encode()
    assert call(app, "POST", f"/account/{link}/domains/", other_form, headers=headers,
                raw=True)[0] == 403
    theirs = urlencode({"csrf": token, "store": other_store_id, "name": "c.example.com"}).encode()
    status, _, answer = call(app, "POST", f"/account/{link}/domains/", theirs, headers=headers,
                             raw=True)
    assert status == 303 and "no%20such%20store" in answer["Location"]
    assert call(app, "POST", f"/account/{link}x/domains/", form, headers=headers,
                raw=True)[0] == 403
    with db_session:
        assert [d.name for d in CustomDomain.select()] == ["shop.example.com"]
        domain_id = CustomDomain.get(name="shop.example.com").id
        actors = {a.actor for a in AuditEntry.select()}
    assert actors == {f"customer:{customer_id}"}
    remove = urlencode({"csrf": token, "store": store}).encode()
    assert call(app, "POST", f"/account/{link}/domains/{domain_id}/remove/", remove,
                headers=headers, raw=True)[0] == 303
    with db_session:
        assert CustomDomain[domain_id].status == "removing"


def test_nginx_accepts_a_vhost_with_custom_domains(tmp_path):
    """The template with a certified domain and one still waiting, checked by nginx -t."""
    import os
    import subprocess

    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from tests.test_vhost import ROLE
    cert, key = tmp_path / "shop.example.com.1f.crt", tmp_path / "shop.example.com.1f.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=shop.example.com"],
                   check=True, capture_output=True)
    env = Environment(loader=FileSystemLoader(ROLE / "templates"), undefined=StrictUndefined,  # noqa: S701 (an nginx config)
                      keep_trailing_newline=True)
    env.filters["basename"] = os.path.basename
    text = env.get_template("vhost.conf.j2").render(
        ansible_managed="m", nginx_site_fqdn="janes-shop.stores.test", nginx_site_state="present",
        nginx_site_http_listen="127.0.0.1:8080", nginx_site_https_listen="127.0.0.1:8443",
        nginx_site_ssl_certificate=str(cert), nginx_site_ssl_certificate_key=str(key),
        nginx_site_client_max_body_size="100m", nginx_site_upstream_port=9001,
        nginx_site_upstream_address="127.0.0.1",
        nginx_site_proxy_read_timeout="120s", nginx_site_installation_id="eb-test",
        nginx_site_acme_challenge_upstream="http://127.0.0.1:8000",
        nginx_site_store_certificate_dir=str(tmp_path),
        nginx_site_custom_domains=[
            {"name": "shop.example.com", "cert": f"/controller/{cert.name}",
             "key": f"/controller/{key.name}"},
            {"name": "new.example.org", "cert": "", "key": ""}])
    assert f"ssl_certificate {cert};" in text and f"ssl_certificate_key {key};" in text
    assert text.count("location ^~ /.well-known/acme-challenge/") == 2
    assert text.count("server_name new.example.org;") == 1  # HTTP only, no certificate yet
    assert text.count("server_name shop.example.com;") == 2
    (tmp_path / "site.conf").write_text(text)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
        f"http {{ access_log off; include {tmp_path}/site.conf; }}\n")
    result = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf"),
                             "-e", str(tmp_path / "error.log")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
