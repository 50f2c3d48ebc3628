"""The Docker hosts stores live on, read from the Ansible inventory, and placement."""

from __future__ import annotations

import ipaddress
import re
import shlex
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import yaml
from pony.orm import count, select

from provisioner.config import Config
from provisioner.models import Instance, LogEntry

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"


class NoCapacity(Exception):
    """Every Docker host holds its maximum of stores."""


class BadInventory(NoCapacity):
    """The inventory's Docker hosts cannot be used as written (no store can be placed)."""


@dataclass(frozen=True)
class DockerHost:
    name: str
    url: str
    max_stores: int
    # Reached without SSH (ansible_connection local): its files are this machine's.
    local: bool = False
    # Where its stores' ports are published (and answer their health checks).
    address: str = "127.0.0.1"
    # provisioner_drain: no new store is placed here; its stores stay until moved.
    draining: bool = False
    # provisioner_data_root / provisioner_backup_root: where its stores' files live
    # (None: the service's CUSTOMER_DATA_ROOT / BACKUP_ROOT).
    data_root: str | None = None
    backup_root: str | None = None
    # How `ssh` reaches it (not local): the inventory's ansible_host, ansible_user,
    # ansible_port, ansible_ssh_private_key_file and ansible_ssh_common_args.
    ssh: tuple[str, ...] = ()
    # The nginx host of its stores (provisioner_edge, else the edge group's first host,
    # else itself): group_vars/stores.yml's store_edge_host.
    edge: str = ""
    # Its edge is this machine (its vhosts can be read here).
    edge_local: bool = False


def load_hosts(config: Config) -> list[DockerHost]:
    """Hosts of the `docker_hosts` group in the inventory file, in file order (parsed
    again only when the file's text changes: a run over a fleet asks once per store)."""
    text = config.inventory_file.read_text()
    stamp = (str(config.inventory_file), text, config.max_stores_per_host)
    cached = _parsed.get("last")
    if cached is None or cached[0] != stamp:
        cached = _parsed["last"] = (stamp, _parse_hosts(config, text))
    return list(cached[1])


# One (stamp, hosts) pair, replaced whole: threads of the service share it.
_parsed: dict = {}


def _parse_hosts(config: Config, text: str) -> list[DockerHost]:
    data = yaml.safe_load(text) or {}
    group = data.get("docker_hosts") or (data.get("all", {}).get("children", {})
                                         .get("docker_hosts")) or {}
    group_vars = group.get("vars") or {}
    edges = data.get("edge") or (data.get("all", {}).get("children", {}).get("edge")) or {}
    first_edge = next(iter(edges.get("hosts") or {}), None)
    hosts = []
    for name, host_vars in (group.get("hosts") or {}).items():
        merged = {**group_vars, **(host_vars or {})}
        hosts.append(DockerHost(
            name=name,
            url=merged.get("ebuilder_instance_docker_host", DEFAULT_DOCKER_URL),
            max_stores=int(merged.get("provisioner_max_stores", config.max_stores_per_host)),
            local=merged.get("ansible_connection") == "local",
            address=private_address(name, merged.get("provisioner_private_address")),
            draining=str(merged.get("provisioner_drain", False)).lower() in ("true", "yes", "1"),
            data_root=_path(merged.get("provisioner_data_root")),
            backup_root=_path(merged.get("provisioner_backup_root")),
            ssh=() if merged.get("ansible_connection") == "local" else ssh_command(name, merged),
            edge=(edge := str(merged.get("provisioner_edge") or first_edge or name)),
            edge_local=_is_local(edge, (edges.get("hosts") or {}).get(edge) or (
                merged if edge == name else {})),
        ))
    if not hosts:
        raise NoCapacity(f"{config.inventory_file} lists no host in group docker_hosts")
    return hosts


def _is_local(name: str, host_vars: dict) -> bool:
    """Ansible reaches this inventory host without SSH (its files are this machine's)."""
    connection = (host_vars or {}).get("ansible_connection")
    return connection == "local" or (connection is None and name in ("localhost", "127.0.0.1"))


def _path(value: object) -> str | None:
    return str(value).rstrip("/") or "/" if value not in (None, "") else None


def ssh_command(name: str, host_vars: dict) -> tuple[str, ...]:
    """`ssh` as Ansible's ssh connection would run it for this host (a command follows)."""
    command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if host_vars.get("ansible_port"):
        command += ["-p", str(host_vars["ansible_port"])]
    if host_vars.get("ansible_user"):
        command += ["-l", str(host_vars["ansible_user"])]
    if host_vars.get("ansible_ssh_private_key_file"):
        command += ["-i", str(host_vars["ansible_ssh_private_key_file"])]
    for option in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        command += shlex.split(str(host_vars.get(option) or ""))
    return (*command, "--", str(host_vars.get("ansible_host") or name))


def data_root(config: Config, host: DockerHost) -> str:
    return host.data_root or str(config.customer_data_root)


def backup_root(config: Config, host: DockerHost) -> str:
    return host.backup_root or str(config.backup_root)


def private_address(host: str, value: object) -> str:
    """A host's provisioner_private_address: loopback or private, never every address
    nor a public one (a store's port must not be reachable from the internet)."""
    if value is None:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        raise BadInventory(f"{host}: provisioner_private_address {value!r} is not an IP "
                         f"address") from None
    if address.is_unspecified or not (address.is_loopback or address.is_private):
        raise BadInventory(f"{host}: provisioner_private_address {value} must be loopback or "
                         f"private: stores are published on it")
    return str(address)


def host_of(config: Config, name: str) -> DockerHost:
    """A store's Docker host by inventory name (the default engine on loopback if the
    inventory no longer lists it)."""
    for host in load_hosts(config):
        if host.name == name:
            return host
    return DockerHost(name=name, url=DEFAULT_DOCKER_URL, max_stores=0)


def free_port(config: Config, avoid: Iterable[int] = ()) -> int:
    """The lowest port no live store has, on any host (hosts may share a loopback), and
    that no other program listens on here: a port someone else took would fail the store."""
    used = set(select(i.port for i in Instance if i.live)) | set(avoid)
    for port in range(config.port_range_start, config.port_range_end + 1):
        if port not in used and bindable("127.0.0.1", port):
            return port
    raise NoCapacity(f"no free port in {config.port_range_start}-{config.port_range_end}")


def bindable(address: str, port: int) -> bool:
    """Nothing on this machine listens on address:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


PORT_TAKEN = re.compile(r"port is already allocated|address already in use", re.IGNORECASE)


def move_if_port_taken(config: Config, instance: Instance, error: str) -> int | None:
    """Another program holds the store's port (the container could not publish it):
    give the store a free one, so its retry can succeed. The new port, or None."""
    if not PORT_TAKEN.search(error or ""):
        return None
    old = instance.port
    instance.port = free_port(config, avoid={old})
    LogEntry(instance=instance, level="warning",
             message=f"port {old} is taken by another program; the store moves to "
                     f"{instance.port}")
    return instance.port


def place(config: Config) -> str:
    """The host with the most free room for a new store, never a draining one (needs a
    db_session)."""
    used = dict(select((i.docker_host, count(i)) for i in Instance if i.live))
    open_hosts = [h for h in load_hosts(config) if not h.draining]
    best = max(open_hosts, key=lambda h: h.max_stores - used.get(h.name, 0), default=None)
    if best is None or best.max_stores - used.get(best.name, 0) <= 0:
        raise NoCapacity("every Docker host is full or draining (raise provisioner_max_stores "
                         "or add a host)")
    return best.name


def capacity(config: Config) -> list[dict]:
    """Each Docker host's room, for the dashboard and `provisioner hosts` (needs a
    db_session; one query). Stores on a host the inventory no longer lists are shown
    under that name, with no room."""
    used = dict(select((i.docker_host, count(i)) for i in Instance if i.live))
    rows = [{"name": h.name, "address": h.address, "stores": used.pop(h.name, 0),
             "max_stores": h.max_stores, "draining": h.draining, "listed": True}
            for h in load_hosts(config)]
    rows += [{"name": name, "address": None, "stores": n, "max_stores": 0, "draining": True,
              "listed": False} for name, n in sorted(used.items())]
    for row in rows:
        row["free"] = max(row["max_stores"] - row["stores"], 0) if not row["draining"] else 0
    return rows
