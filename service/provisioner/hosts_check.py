"""`provisioner hosts --check`: can each Docker host of the inventory take stores?

Run after adding a host to inventory/hosts.yml and before it gets its first store:
Ansible reaches it (SSH unless it is this machine), its Docker engine answers, the
stores' network is there (or will be made with the first store), its private address
is usable and, on this machine, ports of the range are free. Changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from provisioner import docker_facts, docker_hosts
from provisioner.config import Config


@dataclass(frozen=True)
class Check:
    host: str
    what: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.host}: {self.what}: {'ok' if self.ok else 'FAILED'} ({self.detail})"


def check_all(config: Config, only: str | None = None) -> list[Check]:
    hosts = [h for h in docker_hosts.load_hosts(config) if only in (None, h.name)]
    if only is not None and not hosts:
        return [Check(only, "inventory", False, f"not in {config.inventory_file}")]
    results: list[Check] = []
    for host in hosts:
        results += [_ansible(config, host), *_docker(config, host), _ports(config, host)]
    return results


def _ansible(config: Config, host: docker_hosts.DockerHost) -> Check:
    """What every playbook does first: reach the host the way the inventory says."""
    command = [str(Path(sys.executable).parent / "ansible"), "-i", str(config.inventory_file),
               host.name, "-m", "ansible.builtin.ping", "-o"]
    env = {**os.environ, "ANSIBLE_CONFIG": str(config.project_dir / "ansible.cfg"),
           "ANSIBLE_NOCOLOR": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(host.name, "ansible", False, str(exc))
    how = "this machine" if host.local else "over SSH"
    if done.returncode == 0 and "SUCCESS" in done.stdout:
        return Check(host.name, "ansible", True, f"reached {how}")
    text = (done.stdout + done.stderr).strip().splitlines()
    return Check(host.name, "ansible", False, text[-1][:300] if text else f"rc {done.returncode}")


def _docker(config: Config, host: docker_hosts.DockerHost) -> list[Check]:
    try:
        version = docker_facts.docker(host, "version", "--format", "{{.Server.Version}}",
                                      timeout=30).strip()
    except docker_facts.DockerUnavailable as exc:
        return [Check(host.name, "docker", False, f"{host.url}: {exc}")]
    checks = [Check(host.name, "docker", True, f"engine {version} at {host.url}")]
    try:
        docker_facts.docker(host, "network", "inspect", config.container_network,
                            timeout=30)
        checks.append(Check(host.name, "network", True, f"{config.container_network} exists"))
    except docker_facts.DockerUnavailable:
        checks.append(Check(host.name, "network", True, f"{config.container_network} will be "
                                                        f"made with the first store"))
    return checks


def _ports(config: Config, host: docker_hosts.DockerHost) -> Check:
    span = f"{config.port_range_start}-{config.port_range_end}"
    ports = range(config.port_range_start, config.port_range_end + 1)
    if host.ssh:
        try:
            listening = _listening(host)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            return Check(host.name, "ports", False, f"cannot list its listening ports: {exc}")
        free = sum(1 for port in ports if not listening & {(host.address, port),
                                                            ("*", port)})
    else:
        free = sum(1 for port in ports if docker_hosts.bindable(host.address, port))
    return Check(host.name, "ports", free > 0, f"{free} of {span} free on {host.address}")


def _listening(host: docker_hosts.DockerHost) -> set[tuple[str, int]]:
    """(address, port) of the host's listening TCP sockets (`ss`, over SSH); "*" for
    every address."""
    done = subprocess.run([*host.ssh, "ss -Hltn"], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip() or f"rc {done.returncode}")[:300])
    found = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        if not port.isdigit():
            continue
        address = address.strip("[]").split("%")[0]
        wildcard = address in ("*", "0.0.0.0", "::")  # noqa: S104 (read, not bound)
        found.add(("*" if wildcard else address, int(port)))
    return found
