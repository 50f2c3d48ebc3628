"""Two real Docker engines on this machine: stores spread over both, and every
playbook acts on the engine its store lives on; the second one's stores are published
on its own address (127.0.0.2), which nginx proxies to."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pony.orm import db_session

from provisioner import admin, docker_facts
from provisioner.models import Instance
from provisioner.testing import stripe_events
from provisioner.worker import Worker
from tests.conftest import apply_events
from tests.integration.conftest import https_request

ROOT = Path("/run/ebtest-engine2")
DATA_ROOT = Path("/var/lib/ebtest-engine2")
SOCKET = f"unix://{ROOT}/docker.sock"
BRIDGE = "ebtest-br0"


def docker_b(*args: str) -> str:
    return subprocess.run(["docker", "-H", SOCKET, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def engine_b(engine):
    """A second dockerd with its own socket, data root, exec root, pid file and networks."""
    ROOT.mkdir(parents=True, exist_ok=True)
    # Its own default bridge: with --bridge=none dockerd deletes docker0, which
    # belongs to the first engine.
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
        for command in (["ip", "link", "add", BRIDGE, "type", "bridge"],
                        ["ip", "addr", "add", "172.29.255.1/24", "dev", BRIDGE],
                        ["ip", "link", "set", BRIDGE, "up"]):
            subprocess.run(command, check=True, capture_output=True)
    log = open(ROOT / "dockerd.log", "w")  # noqa: SIM115 (lives as long as the daemon)
    daemon = subprocess.Popen(
        ["dockerd", "--host", SOCKET, "--data-root", str(DATA_ROOT),
         "--exec-root", str(ROOT / "exec"), "--pidfile", str(ROOT / "docker.pid"),
         "--bridge", BRIDGE, "--iptables=false", "--ip-masq=false",
         "--default-address-pool", "base=172.29.0.0/17,size=24"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "-H", SOCKET, "info"],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or daemon.poll() is not None:
                pytest.fail(f"second dockerd did not start: {(ROOT / 'dockerd.log').read_text()}")
            time.sleep(0.3)
        saved = subprocess.run(["docker", "save", "ebuilder-standin:latest"], check=True,
                               capture_output=True).stdout
        subprocess.run(["docker", "-H", SOCKET, "load"], input=saved, check=True,
                       capture_output=True)
        yield SOCKET
    finally:
        leftovers = subprocess.run(["docker", "-H", SOCKET, "ps", "-aq"], capture_output=True,
                                   text=True).stdout.split()
        if leftovers:
            subprocess.run(["docker", "-H", SOCKET, "rm", "-f", *leftovers], capture_output=True)
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()
        shutil.rmtree(DATA_ROOT, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        assert subprocess.run(["ip", "link", "show", "docker0"],
                              capture_output=True).returncode == 0, "engine 1 lost docker0"


@pytest.fixture
def two_host_config(service, engine_b, tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "docker_hosts:\n"
        "  vars:\n"
        "    ansible_connection: local\n"
        "    ansible_python_interpreter: '{{ ansible_playbook_python }}'\n"
        "    provisioner_max_stores: 10\n"
        "  hosts:\n"
        "    engine-a:\n"
        "      ebuilder_instance_docker_host: unix:///var/run/docker.sock\n"
        "    engine-b:\n"
        f"      ebuilder_instance_docker_host: {engine_b}\n"
        # Its stores publish on another address than loopback's first, as a host's
        # private address would be: nginx proxies there, the live health asks there.
        "      provisioner_private_address: 127.0.0.2\n"
        # Its stores' files elsewhere, as on another machine.
        f"      provisioner_data_root: {DATA_ROOT}/customers\n"
        f"      provisioner_backup_root: {DATA_ROOT}/backups\n"
        "stores:\n"
        "  hosts: {}\n")
    # This test drives its own worker with the two-host inventory.
    service.paused.set()
    yield dataclasses.replace(service.config, inventory_path=str(inventory))
    service.paused.clear()


def running_on(url: str) -> set[str]:
    """This test's running stores on an engine (the first engine is shared: other
    tests' stores may come and go there meanwhile)."""
    out = subprocess.run(["docker", "-H", url, "ps", "--format", "{{.Names}}"],
                         check=True, capture_output=True, text=True).stdout
    return {name for name in out.split() if name.startswith("ebuilder_spread-")}


def drain(config, names, timeout=240):
    worker = Worker(config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.run_once()
        with db_session:
            states = {i.subdomain: i.status for i in Instance.select(lambda i: i.live)}
        if all(states.get(n) in ("running", "stopped") for n in names):
            return states
        time.sleep(0.2)
    raise AssertionError(f"stores not converged: {states}")


def test_stores_spread_over_both_engines_and_actions_hit_the_right_one(service,
                                                                       two_host_config):
    names = ["spread-a", "spread-b", "spread-c", "spread-d"]
    for name in names:
        apply_events(two_host_config, stripe_events.signup(
            subdomain=name, site_name=name, email=f"{name}@example.com"))
    drain(two_host_config, names)
    with db_session:
        placed = {i.subdomain: i.docker_host for i in Instance.select(lambda i: i.live)}
    assert sorted(placed.values()) == ["engine-a", "engine-a", "engine-b", "engine-b"]
    on_a = running_on("unix:///var/run/docker.sock")
    on_b = running_on(SOCKET)
    for name, host in placed.items():
        assert (f"ebuilder_{name}" in on_b) == (host == "engine-b"), (name, host)
        assert (f"ebuilder_{name}" in on_a) == (host == "engine-a"), (name, host)
        assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200
    target = next(n for n, h in placed.items() if h == "engine-b")
    bindings = json.loads(docker_b("inspect", "--format", "{{json .HostConfig.PortBindings}}",
                                   f"ebuilder_{target}"))
    assert bindings["8000/tcp"][0]["HostIp"] == "127.0.0.2"
    vhost = (service.nginx.sites / f"{target}.stores.test.conf").read_text()
    with db_session:
        port = Instance.get(subdomain=target, live=True).port
        assert docker_facts.live_health(two_host_config, Instance.get(
            subdomain=target, live=True))["healthy"]
    assert f"proxy_pass http://127.0.0.2:{port};" in vhost

    with db_session:
        target_id = Instance.get(subdomain=target, live=True).id
        admin.queue_action(target_id, "stop", admin.Actor("test"))
    drain(two_host_config, names)
    assert f"ebuilder_{target}" not in running_on(SOCKET)
    assert running_on("unix:///var/run/docker.sock") == on_a
    with db_session:
        health = docker_facts.live_health(two_host_config, Instance[target_id])
    assert health["container"]["exists"] and not health["container"]["running"]
    with db_session:
        admin.queue_action(target_id, "start", admin.Actor("test"))
    drain(two_host_config, names)
    assert f"ebuilder_{target}" in running_on(SOCKET)

