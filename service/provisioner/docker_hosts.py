"""The Docker hosts stores live on, read from the Ansible inventory, and placement."""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from pony.orm import count, select

from provisioner.config import Config
from provisioner.models import Instance

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"


class NoCapacity(Exception):
    """Every Docker host holds its maximum of stores."""


@dataclass(frozen=True)
class DockerHost:
    name: str
    url: str
    max_stores: int


def load_hosts(config: Config) -> list[DockerHost]:
    """Hosts of the `docker_hosts` group in the inventory file, in file order."""
    data = yaml.safe_load(config.inventory_file.read_text()) or {}
    group = data.get("docker_hosts") or (data.get("all", {}).get("children", {})
                                         .get("docker_hosts")) or {}
    group_vars = group.get("vars") or {}
    hosts = []
    for name, host_vars in (group.get("hosts") or {}).items():
        merged = {**group_vars, **(host_vars or {})}
        hosts.append(DockerHost(
            name=name,
            url=merged.get("ebuilder_instance_docker_host", DEFAULT_DOCKER_URL),
            max_stores=int(merged.get("provisioner_max_stores", config.max_stores_per_host)),
        ))
    if not hosts:
        raise NoCapacity(f"{config.inventory_file} lists no host in group docker_hosts")
    return hosts


def host_url(config: Config, name: str) -> str:
    for host in load_hosts(config):
        if host.name == name:
            return host.url
    return DEFAULT_DOCKER_URL


def free_port(config: Config) -> int:
    """The lowest port no live store has, on any host: hosts may share a loopback."""
    used = set(select(i.port for i in Instance if i.live))
    for port in range(config.port_range_start, config.port_range_end + 1):
        if port not in used:
            return port
    raise NoCapacity(f"no free port in {config.port_range_start}-{config.port_range_end}")


def place(config: Config) -> str:
    """The host with the most free room for a new store (needs a db_session)."""
    used = dict(select((i.docker_host, count(i)) for i in Instance if i.live))
    best = max(load_hosts(config), key=lambda h: h.max_stores - used.get(h.name, 0))
    if best.max_stores - used.get(best.name, 0) <= 0:
        raise NoCapacity("every Docker host is full (raise provisioner_max_stores or add a host)")
    return best.name
