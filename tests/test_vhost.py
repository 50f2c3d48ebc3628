"""The vhost template, rendered the way Ansible renders it, and checked by nginx itself."""

import shutil
import subprocess
from pathlib import Path

import pytest
from jinja2 import Environment, FileSystemLoader, StrictUndefined

ROLE = Path(__file__).resolve().parents[1] / "roles" / "nginx_site"


def render(state="present", template="vhost.conf.j2", **overrides) -> str:
    # Autoescape off on purpose: this renders an nginx config, not HTML (as Ansible does).
    env = Environment(loader=FileSystemLoader(ROLE / "templates"), undefined=StrictUndefined,  # noqa: S701
                      keep_trailing_newline=True)
    variables = {
        "ansible_managed": "Ansible managed",
        "nginx_site_fqdn": "janes-shop.stores.test",
        "nginx_site_state": state,
        "nginx_site_http_listen": "127.0.0.1:8080",
        "nginx_site_https_listen": "127.0.0.1:8443",
        "nginx_site_ssl_certificate": "/certs/wildcard.pem",
        "nginx_site_ssl_certificate_key": "/certs/wildcard.key",
        "nginx_site_client_max_body_size": "100m",
        "nginx_site_upstream_port": 9001,
        "nginx_site_upstream_address": "127.0.0.1",
        "nginx_site_proxy_read_timeout": "120s",
        "nginx_site_installation_id": "eb-test",
        "nginx_site_base_domain": "stores.test",
        **overrides,
    }
    return env.get_template(template).render(**variables)


def test_running_store_is_proxied_over_tls_with_a_redirect_from_http():
    text = render()
    assert "listen 127.0.0.1:8080;" in text
    assert "return 301 https://$host$request_uri;" in text
    assert "listen 127.0.0.1:8443 ssl;" in text
    assert text.count("server_name janes-shop.stores.test;") == 2
    assert "ssl_certificate /certs/wildcard.pem;" in text
    assert "proxy_pass http://127.0.0.1:9001;" in text
    for header in ("Host $host", "X-Forwarded-For", "X-Forwarded-Proto $scheme",
                   "Upgrade $http_upgrade", "Connection $http_connection"):
        assert f"proxy_set_header {header}" in text
    assert "client_max_body_size 100m;" in text
    assert "return 503" not in text
    assert "# ebuilder-installation: eb-test" in text


def test_a_store_on_another_docker_host_is_proxied_to_its_private_address():
    assert "proxy_pass http://10.213.2.2:9001;" in render(
        nginx_site_upstream_address="10.213.2.2")


def test_catchall_answers_every_other_name_under_the_domain_with_404():
    text = render(template="catchall.conf.j2")
    assert "server_name *.stores.test;" in text
    assert "return 404" in text and "proxy_pass" not in text
    # Never the distribution's default server: no clash with its default_server.
    assert "default_server" not in text
    assert "# ebuilder-installation: eb-test" in text


@pytest.mark.parametrize("state, words", [("suspended", "suspended"), ("closed", "closed")])
def test_suspended_and_closed_stores_get_a_503_page_and_no_proxy(state, words):
    text = render(state)
    assert "return 503" in text and words in text
    assert "proxy_pass" not in text


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
@pytest.mark.parametrize("state, template", [("present", "vhost.conf.j2"),
                                             ("suspended", "vhost.conf.j2"),
                                             ("closed", "vhost.conf.j2"),
                                             ("present", "catchall.conf.j2")])
def test_nginx_accepts_the_rendered_vhost(tmp_path, state, template):
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=*.stores.test"],
                   check=True, capture_output=True)
    (tmp_path / "site.conf").write_text(render(state, template,
                                               nginx_site_ssl_certificate=str(cert),
                                               nginx_site_ssl_certificate_key=str(key)))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
        f"http {{ access_log off; include {tmp_path}/site.conf; }}\n")
    result = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf"),
                             "-e", str(tmp_path / "error.log")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
