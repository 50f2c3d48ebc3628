"""The rig of network-namespace hosts (scripts/netns-hosts.sh, tests/netns_hosts.py):
Ansible reaches each host over SSH, each host's docker is its own engine with the
store image, a port a container publishes on a host is reachable at that host's
address only, and teardown leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from provisioner.testing.stack import free_port
from tests import netns_hosts
from tests.integration.conftest import poll

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("EBUILDER_IMAGE", "ebuilder-standin:latest")


def unavailable(reason: str):
    """Fail (CI set: root, Docker and sshd are part of the tested setup) or skip."""
    message = f"network-namespace hosts unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def check_machine() -> None:
    if os.geteuid() != 0:
        unavailable("needs root")
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "version"], capture_output=True).returncode != 0:
        unavailable("no Docker engine answers: run scripts/setup.sh first")
    if not Path("/usr/sbin/sshd").exists():
        unavailable("no /usr/sbin/sshd: run scripts/setup.sh (openssh-server)")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        unavailable(f"no {IMAGE} in the engine: run scripts/setup.sh")


def out(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{argv} failed: {result.stderr.strip()}"
    return result.stdout.strip()


def on(host: netns_hosts.Host, command: str) -> str:
    result = host.ssh(command)
    assert result.returncode == 0, f"{command!r} on {host.name}: {result.stderr.strip()}"
    return result.stdout.strip()


def health(address: str, port: int) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/health/", timeout=2) as response:
            return response.read() if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def leftovers(prefix: str) -> list[str]:
    """Anything on this machine that still carries the rig's prefix."""
    found = [line for command in (["ip", "netns", "list"], ["ip", "-o", "link"],
                                  ["findmnt", "-rn", "-o", "TARGET,SOURCE"])
             for line in out(command).splitlines() if prefix in line]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if prefix in text:
            found.append(f"process {cmdline.parent.name}: {text}")
    found += [str(path) for pattern in (f"/var/lib/{prefix}*", f"/run/{prefix}*")
              for path in Path("/").glob(pattern.lstrip("/"))]
    found += [str(path) for path in Path("/sys/fs/cgroup").glob(f"*/{prefix}*")]
    return found


def test_two_namespace_hosts(tmp_path_factory, tmp_path):
    check_machine()
    state = tmp_path_factory.mktemp("rig")
    prefix = netns_hosts.new_prefix()
    started = time.monotonic()
    hosts = netns_hosts.start(state, prefix, count=2)
    up_seconds = time.monotonic() - started
    try:
        assert [h.name for h in hosts] == [f"{prefix}-h1", f"{prefix}-h2"]
        base = os.environ.get("NETNS_SUBNET_BASE", "10.231")
        assert [h.address for h in hosts] == [f"{base}.1.2", f"{base}.2.2"]

        # Ansible over SSH, with strict host key checking, reaches both hosts.
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump(netns_hosts.inventory(hosts, sys.executable)))
        ping = subprocess.run(
            [str(Path(sys.executable).parent / "ansible"), "-i", str(inventory),
             "docker_hosts", "-m", "ansible.builtin.ping", "-o"],
            capture_output=True, text=True, timeout=120, cwd=PROJECT,
            env={**os.environ, "ANSIBLE_CONFIG": str(PROJECT / "ansible.cfg")})
        assert ping.returncode == 0, ping.stdout + ping.stderr
        for host in hosts:
            assert f"{host.name} | SUCCESS" in ping.stdout, ping.stdout

        # On each host, docker is that host's own engine, and it has the image.
        root_id = out(["docker", "info", "-f", "{{.ID}}"])
        image_id = out(["docker", "image", "inspect", "-f", "{{.Id}}", IMAGE])
        ids = []
        for host in hosts:
            engine = on(host, "docker info -f '{{.ID}}'")
            assert engine == out(["docker", "-H", host.docker_url, "info", "-f", "{{.ID}}"])
            ids.append(engine)
            assert on(host, f"docker image inspect -f '{{{{.Id}}}}' {IMAGE}") == image_id
        assert len({root_id, *ids}) == 3, (root_id, ids)

        # A port published on host 1's address: reachable there, not on loopback here
        # nor at host 2.
        port = free_port()
        on(hosts[0], f"docker run -d --name {prefix}-web -p {hosts[0].address}:{port}:8000"
           " -e SECRET_KEY=s -e ALLOWED_HOSTS=rig.test -e ADMIN_EMAIL=a@rig.test"
           f" -e ADMIN_PASSWORD=p {IMAGE}")
        assert poll(lambda: health(hosts[0].address, port), timeout=30, interval=0.05,
                    what="the store on host 1") == b"ok\n"
        assert refused("127.0.0.1", port)
        assert refused(hosts[1].address, port)
        assert out(["docker", "-H", hosts[1].docker_url, "ps", "-aq"]) == ""
    finally:
        stopping = time.monotonic()
        netns_hosts.stop(state, prefix)
        down_seconds = time.monotonic() - stopping
        print(f"netns rig: up {up_seconds:.1f}s, down {down_seconds:.1f}s")

    assert not state.exists()
    left = leftovers(prefix)
    assert not left, left
