"""The Docker hosts of the inventory: their addresses, their room, draining, and
`provisioner hosts --check` (the integration tests place stores on real engines)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from pony.orm import db_session

from provisioner import admin, docker_hosts, hosts_check
from provisioner.models import Instance


def with_hosts(config, tmp_path, hosts: str):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(f"docker_hosts:\n  hosts:\n{hosts}")
    return dataclasses.replace(config, inventory_path=str(inventory))


def test_a_hosts_private_address_is_loopback_or_private_never_public(config, tmp_path):
    def address(value: str) -> str:
        host = f"    far:\n      provisioner_private_address: '{value}'\n"
        return docker_hosts.load_hosts(with_hosts(config, tmp_path, host))[0].address

    assert address("10.213.2.2") == "10.213.2.2"
    assert address("127.0.0.2") == "127.0.0.2"
    for bad in ("0.0.0.0", "8.8.8.8", "::", "not-an-address"):  # noqa: S104 (refused)
        with pytest.raises(docker_hosts.BadInventory, match="far: provisioner_private_address"):
            address(bad)


def test_a_draining_host_gets_no_new_store_and_the_dashboard_shows_each_hosts_room(
        config, tmp_path):
    two = with_hosts(config, tmp_path, "    busy:\n      provisioner_max_stores: 3\n"
                                       "    empty:\n      provisioner_drain: true\n"
                                       "      provisioner_max_stores: 50\n")
    with db_session:
        Instance(subdomain="one-shop", site_name="o", admin_email="o@example.com", port=19131,
                 docker_host="busy")
        Instance(subdomain="gone-host-shop", site_name="g", admin_email="g@example.com",
                 port=19132, docker_host="retired")
        assert docker_hosts.place(two) == "busy"
        rows = {row["name"]: row for row in docker_hosts.capacity(two)}
        hosts = admin.dashboard(two)["hosts"]
    assert (rows["busy"]["stores"], rows["busy"]["free"], rows["busy"]["draining"]) == \
        (1, 2, False)
    assert (rows["empty"]["stores"], rows["empty"]["free"], rows["empty"]["draining"]) == \
        (0, 0, True)
    assert (rows["retired"]["listed"], rows["retired"]["stores"]) == (False, 1)
    assert [h["name"] for h in hosts] == ["busy", "empty", "retired"]
    only_draining = with_hosts(config, tmp_path, "    empty:\n      provisioner_drain: true\n")
    with db_session, pytest.raises(docker_hosts.NoCapacity, match="full or draining"):
        docker_hosts.place(only_draining)


def test_hosts_check_names_what_a_host_lacks(config, tmp_path):
    broken = with_hosts(config, tmp_path,
                        "    nowhere:\n      ansible_connection: ssh\n"
                        "      ansible_host: 127.0.0.1\n      ansible_port: 1\n"
                        "      ebuilder_instance_docker_host: unix:///nonexistent/docker.sock\n")
    checks = {c.what: c for c in hosts_check.check_all(broken)}
    assert not checks["ansible"].ok and not checks["docker"].ok
    assert "/nonexistent/docker.sock" in checks["docker"].detail
    # Over SSH, like the engine: the host's own listening ports, not this machine's.
    assert not checks["ports"].ok and "Connection refused" in checks["ports"].detail
    assert hosts_check.check_all(broken, "other")[0].line() == \
        f"other: inventory: FAILED (not in {broken.inventory_file})"


def test_hosts_command_lists_room_and_checks_this_machine(config, base_env, tmp_path):
    env = {**base_env, "PROVISIONER_ENV_FILE": str(tmp_path / "none.env")}
    done = subprocess.run([sys.executable, "-m", "provisioner.cli", "hosts", "--check"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "localhost: 0 of 100 stores, room for 100, stores publish on 127.0.0.1" in done.stdout
    assert "localhost: ansible: ok (reached this machine)" in done.stdout
    assert "localhost: docker: ok (engine " in done.stdout


def test_each_host_knows_its_edge_and_whether_that_is_this_machine(config, tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "edge:\n  hosts:\n    localhost:\n"
        "docker_hosts:\n  hosts:\n"
        "    far:\n      ansible_host: 10.0.0.11\n"
        "    own:\n      ansible_host: 10.0.0.12\n      provisioner_edge: edge-2\n")
    hosts = {h.name: h for h in docker_hosts.load_hosts(
        dataclasses.replace(config, inventory_path=str(inventory)))}
    assert (hosts["far"].edge, hosts["far"].edge_local) == ("localhost", True)
    assert (hosts["own"].edge, hosts["own"].edge_local) == ("edge-2", False)
    # No edge group: nginx beside each Docker host, read here only for a local one.
    alone = {h.name: h for h in docker_hosts.load_hosts(with_hosts(
        config, tmp_path, "    here:\n      ansible_connection: local\n"
                          "    there:\n      ansible_host: 10.0.0.13\n"))}
    assert (alone["here"].edge, alone["here"].edge_local) == ("here", True)
    assert (alone["there"].edge, alone["there"].edge_local) == ("there", False)
    assert alone["there"].ssh[-2:] == ("--", "10.0.0.13")
