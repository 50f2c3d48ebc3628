"""Hosts made of Linux network namespaces (scripts/netns-hosts.sh), for tests that
need several real machines: each has its own address, sshd and Docker engine, and is
reachable only over SSH from here. The filesystem is shared, so each host has its own
data and backup roots, and this venv's Python works on every host.

    with netns_hosts.hosts(tmp_path_factory.mktemp("rig")) as hosts:
        inv = netns_hosts.inventory(hosts, sys.executable)

Needs root, Docker, /usr/sbin/sshd (openssh-server) and the stand-in image.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "netns-hosts.sh"
# ssh binds the ControlPath socket at the path plus a 17-character temporary suffix;
# a unix socket path holds at most 107 bytes.
_SUN_PATH_MAX = 107
_SSH_TEMP_SUFFIX = 17


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    docker_url: str
    ssh_key: str
    known_hosts: str
    ssh_config: str
    ssh_control_dir: str
    data_root: str
    backup_root: str

    def ssh_argv(self, command: str) -> list[str]:
        """The argv of `command` run on this host as root (strict host key checking)."""
        return ["ssh", "-F", self.ssh_config, self.address, command]

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(command), capture_output=True, text=True,
                              timeout=timeout)


def _run(args: list[str], env: dict[str, str] | None,
         timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def start(state_dir: Path | str, prefix: str, count: int = 2,
          env: dict[str, str] | None = None, timeout: float = 180) -> list[Host]:
    """Make `count` hosts named <prefix>-h<i>. `env` adds settings of the script
    (NETNS_SUBNET_BASE for a rig beside another, NETNS_EXTRA_IMAGES)."""
    state = Path(state_dir)
    try:
        result = _run(["up", str(state), prefix, str(count)], env, timeout)
    except subprocess.TimeoutExpired as exc:
        _stop_after_failure(state, prefix, f"netns-hosts.sh up took over {timeout}s", exc)
    if result.returncode != 0:
        _stop_after_failure(state, prefix, f"netns-hosts.sh up failed (exit {result.returncode}):"
                            f" {result.stderr.strip()}")
    fields = Host.__dataclass_fields__
    return [Host(**{k: v for k, v in entry.items() if k in fields})
            for entry in json.loads((state / "hosts.json").read_text())]


def _stop_after_failure(state: Path, prefix: str, message: str,
                        cause: BaseException | None = None) -> NoReturn:
    try:
        stop(state, prefix)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        message += f"\n(and cleaning up failed too: {exc})"
    raise RuntimeError(message) from cause


def stop(state_dir: Path | str, prefix: str | None = None, timeout: float = 120) -> None:
    """Remove everything start made (safe to call again, or after a failed start)."""
    result = _run(["down", str(state_dir), *([prefix] if prefix else [])], None, timeout)
    if result.returncode != 0:
        raise RuntimeError(f"netns-hosts.sh down failed (exit {result.returncode}): "
                           f"{result.stderr.strip()}")


def inventory(hosts: list[Host], edge_python: str, host_python: str | None = None) -> dict:
    """An Ansible inventory: the hosts as group docker_hosts (over SSH, their own
    engine, data and backup roots) and this machine as group edge. `host_python` (by
    default `edge_python`; the filesystem is shared) runs the modules on the hosts."""
    docker_hosts = {}
    for host in hosts:
        control_path = f"{host.ssh_control_dir}/%C"
        # %C expands to 40 hex digits.
        length = len(control_path) - 2 + 40 + _SSH_TEMP_SUFFIX
        if length > _SUN_PATH_MAX:
            raise ValueError(f"ControlPath {control_path} is too long ({length} bytes)")
        docker_hosts[host.name] = {
            "ansible_connection": "ssh",
            "ansible_host": host.address,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": host.ssh_key,
            # The project's ansible.cfg turns host key checking off; ssh takes the
            # first -o it gets, so it has to be on here for StrictHostKeyChecking=yes.
            "ansible_host_key_checking": True,
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={host.known_hosts} -o StrictHostKeyChecking=yes"
                f" -o IdentitiesOnly=yes -o ControlMaster=auto -o ControlPersist=60s"
                f" -o ControlPath={control_path}"),
            "ansible_python_interpreter": host_python or edge_python,
            "ebuilder_instance_docker_host": host.docker_url,
            "provisioner_private_address": host.address,
            "provisioner_data_root": host.data_root,
            "provisioner_backup_root": host.backup_root,
        }
    return {
        "all": {
            "children": {
                "docker_hosts": {"hosts": docker_hosts},
                "edge": {"hosts": {"localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": edge_python,
                }}},
            },
        },
    }


def new_prefix() -> str:
    """A prefix of its own for every rig (interface names are at most 15 characters)."""
    return "ebp" + secrets.token_hex(2)


@contextlib.contextmanager
def hosts(state_dir: Path | str, prefix: str | None = None, count: int = 2,
          env: dict[str, str] | None = None) -> Iterator[list[Host]]:
    """start, then always stop: for a fixture (state_dir: e.g. tmp_path_factory.mktemp())."""
    prefix = prefix or new_prefix()
    try:
        yield start(state_dir, prefix, count, env)
    finally:
        stop(state_dir, prefix)


if __name__ == "__main__":  # python -m tests.netns_hosts <state-dir>: a rig to try things on
    rig = start(sys.argv[1], new_prefix())
    print(json.dumps(inventory(rig, sys.executable), indent=2))
