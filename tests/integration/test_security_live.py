"""Security on real Docker and nginx: customer text stays data in every playbook, names
and containers that are not ours are never taken, unknown names never reach a store."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pony.orm import db_session

from provisioner.models import Instance
from provisioner.testing import stripe_events
from tests.integration.conftest import (
    docker,
    https_request,
    inspect,
    poll,
    wait_until_live,
)

PROJECT = Path(__file__).resolve().parents[2]


def hostile_name(tmp_path: Path) -> str:
    mark = tmp_path / "MARK"
    return (f"{{{{ lookup('pipe', 'touch {mark}') }}}} {{% for x in [1] %}}{{{{ 7*7 }}}}"
            f"{{% endfor %}} <b>Jane's</b>")


def signup(service, name: str, site_name: str) -> None:
    for evt in stripe_events.signup(subdomain=name, site_name=site_name,
                                    email=f"{name}@example.com"):
        service.post_event(evt)


def site_name_of(container: str) -> str:
    env = dict(item.split("=", 1) for item in inspect(container)["Config"]["Env"])
    return env["SITE_NAME"]


def sysadmin_playbook(service, *args: str, playbooks: tuple[str, ...] = ()
                      ) -> subprocess.CompletedProcess:
    """`ansible-playbook -i inventory playbooks/<playbook>...` on the DB inventory (several
    playbooks in one run, one after the other, as ansible-playbook allows)."""
    bin_dir = Path(sys.executable).parent
    return subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", "inventory",
         *(f"playbooks/{playbook}" for playbook in playbooks), *args],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
        env={**service.env, "PATH": f"{bin_dir}:{service.env['PATH']}"})


def test_a_hostile_store_name_is_data_in_the_service_and_in_every_playbook(service, tmp_path):
    name = hostile_name(tmp_path)
    signup(service, "hostile-shop", name)
    wait_until_live("hostile-shop")
    assert site_name_of("ebuilder_hostile-shop") == name
    with db_session:
        assert Instance.get(subdomain="hostile-shop").site_name == name
    assert not (tmp_path / "MARK").exists()

    # The sysadmin's path: the DB inventory, every playbook that takes store data.
    # One ansible-playbook run for all but destroy (each run costs seconds to start).
    result = sysadmin_playbook(service, "--limit", "hostile-shop", playbooks=(
        "stop.yml", "start.yml", "restart.yml", "suspend.yml", "provision.yml", "health.yml",
        "nginx.yml", "sync.yml", "backup.yml"))
    assert result.returncode == 0, f"{result.stdout[-3000:]}{result.stderr}"
    assert not (tmp_path / "MARK").exists(), "a playbook ran the store name"
    assert site_name_of("ebuilder_hostile-shop") == name
    result = sysadmin_playbook(service, "--limit", "hostile-shop", "-e",
                               f"store_archive={tmp_path}/final.tar.gz", playbooks=("destroy.yml",))
    assert result.returncode == 0, f"destroy.yml: {result.stdout[-3000:]}{result.stderr}"
    assert not (tmp_path / "MARK").exists(), "destroy.yml ran the store name"
    assert (tmp_path / "final.tar.gz").stat().st_size > 0


def test_a_container_that_is_not_ours_is_never_replaced(service):
    foreign = docker("run", "-d", "--name", "ebuilder_taken-shop", "--label", "someone=else",
                     "-e", "SECRET_KEY=x", "-e", "ALLOWED_HOSTS=x", "-e", "ADMIN_EMAIL=a@b.c",
                     "-e", "ADMIN_PASSWORD=p", "ebuilder-standin:latest")
    try:
        sent_before = len(service.smtp.messages)
        signup(service, "taken-shop", "Taken")

        def attention():
            with db_session:
                instance = Instance.get(subdomain="taken-shop")
                return instance is not None and instance.status == "needs_attention" and \
                    instance.status_message
        message = poll(attention, timeout=120, what="taken-shop needs attention")
        assert message.startswith("conflict: container ebuilder_taken-shop exists and does not")
        container = inspect("ebuilder_taken-shop")
        assert container["Id"] == foreign and container["State"]["Running"]
        assert container["Config"]["Labels"]["someone"] == "else"
        assert "ebuilder.installation" not in container["Config"]["Labels"]
        poll(lambda: any(b"taken-shop needs attention" in m
                         for m in service.smtp.messages[sent_before:]),
             timeout=30, what="the admin's email")
    finally:
        subprocess.run(["docker", "rm", "-f", "ebuilder_taken-shop"], capture_output=True)


def test_another_installations_containers_are_left_alone(service):
    name = "ebuilder_other-install-shop"
    docker("create", "--name", name, "--label", "ebuilder.managed=true",
           "--label", "ebuilder.installation=someone-else", "--label", "ebuilder.instance_id=1",
           "ebuilder-standin:latest")
    try:
        result = service.cli("sync")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "other-install-shop" not in result.stdout
        result = service.cli("cleanup")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "other-install-shop" not in result.stdout
        assert inspect(name)["State"]["Status"] == "created"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def _tls_request(port: int, server_name: str | None, host: str) -> tuple[int, bytes]:
    """HTTPS without certificate checks: what a browser sees for any name or the bare IP."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=server_name) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("server_name, host", [
    ("nosuch.stores.test", "nosuch.stores.test"),
    ("evil.example", "evil.example"),
    (None, "127.0.0.1"),
])
def test_unknown_names_never_reach_a_store(service, server_name, host):
    signup(service, "known-shop", "Known")
    wait_until_live("known-shop")
    assert https_request(service.nginx, "known-shop.stores.test", "/health/")[0] == 200
    status, body = _tls_request(service.nginx.https_port, server_name, host)
    assert status == 404 and b"No such store" in body


def test_a_data_dir_of_another_installation_is_never_used(service):
    """Installations that share a Docker host and data root never take each other's data."""
    signup(service, "shared-shop", "Shared")
    wait_until_live("shared-shop")
    with db_session:
        store = Instance.get(subdomain="shared-shop")
        store_id, data_dir = store.id, service.config.customer_data_root / str(store.id)
    owner = data_dir / ".installation"
    assert owner.read_text().strip() == service.config.installation_id
    owner.write_text("someone-else\n")
    status, _ = service.api("POST", f"/api/instances/{store_id}/restart/")
    assert status == 202

    def attention():
        with db_session:
            instance = Instance[store_id]
            return instance.status == "needs_attention" and instance.status_message
    message = poll(attention, timeout=120, what="shared-shop needs attention")
    assert message.startswith(f"conflict: data dir {data_dir} belongs to installation "
                              "someone-else")
    assert (data_dir / "db").is_dir() and owner.read_text() == "someone-else\n"
