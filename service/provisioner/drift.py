"""Where Docker and nginx differ from the DB, store by store.

`provisioner sync --check` prints it and changes nothing, so a sysadmin sees the
drift before anything is touched; `provisioner sync` converges what it finds.
What a store should look like is `with_target`'s answer, the same record the
playbooks get: its container running or not, its image, its vhost's state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pony.orm import db_session

from provisioner import docker_facts, docker_hosts
from provisioner.ansible.store_vars import with_target
from provisioner.config import Config
from provisioner.models import Instance
from provisioner.states import StoreState

# The vhost template's own header lines (roles/nginx_site/templates/vhost.conf.j2).
INSTALLATION_LINE = re.compile(r"^# ebuilder-installation: (\S+)$", re.MULTILINE)
STORE_LINE = re.compile(r"^# eBuilder store (\S+) \((\w+)\)$", re.MULTILINE)


@dataclass
class StoreDrift:
    instance_id: int
    subdomain: str
    docker_host: str
    problems: list[str] = field(default_factory=list)
    # Held by an admin (or a sysadmin's stop): reported, never converged by sync.
    held: bool = False


@dataclass
class Drift:
    stores: list[StoreDrift] = field(default_factory=list)
    # Containers labelled as this installation's that no live store owns: (host, name, state).
    unknown_containers: list[tuple[str, str, str]] = field(default_factory=list)
    # Vhost files of this installation no live store owns: (host, path).
    extra_vhosts: list[tuple[str, str]] = field(default_factory=list)
    # Hosts whose Docker engine did not answer, or whose vhosts cannot be read from here.
    unchecked: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> list[StoreDrift]:
        return [s for s in self.stores if s.problems]

    @property
    def clean(self) -> bool:
        return not (self.drifted or self.unknown_containers or self.extra_vhosts)


def _vhosts(config: Config) -> dict[str, tuple[str, Path]]:
    """This installation's vhost files on this machine: fqdn -> (state, path)."""
    found: dict[str, tuple[str, Path]] = {}
    directory = config.nginx_config_dir
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.conf")):
        try:
            head = path.read_text(errors="replace")[:2000]
        except OSError:
            continue
        owner, store = INSTALLATION_LINE.search(head), STORE_LINE.search(head)
        if owner and store and owner.group(1) == config.installation_id:
            found[store.group(1)] = (store.group(2), path)
    return found


def find(config: Config, progress=lambda text: None) -> Drift:
    """Read every Docker host and this machine's vhosts (those of the stores whose nginx
    host is this machine); compare with the DB. Changes nothing."""
    drift = Drift()
    reality: dict[str, dict[str, dict]] = {}
    local_hosts: set[str] = set()
    for host in docker_hosts.load_hosts(config):
        progress(f"reading containers on {host.name}…")
        try:
            reality[host.name] = docker_facts.containers_on(config, host)
        except docker_facts.DockerUnavailable as exc:
            drift.unchecked.append(f"{host.name}: Docker did not answer ({exc})")
            continue
        if host.edge_local:
            local_hosts.add(host.name)
        else:
            drift.unchecked.append(f"{host.name}: vhosts not read (its nginx host "
                                   f"{host.edge} is not this machine)")
    vhosts = _vhosts(config) if local_hosts else {}
    owned_vhosts: set[str] = set()
    known: set[tuple[str, str]] = set()
    with db_session:
        for instance in Instance.select(lambda i: i.live).order_by(Instance.id):
            known.add((instance.docker_host, instance.container_name))
            owned_vhosts.add(config.store_host(instance.subdomain))
            if instance.provisioned_at is None and instance.status != StoreState.FAILED:
                continue  # its first provisioning has made nothing to compare yet
            store = StoreDrift(instance.id, instance.subdomain, instance.docker_host,
                               held=instance.admin_hold)
            drift.stores.append(store)
            if instance.status == StoreState.FAILED:
                # Its retries ran out; whatever failed may be fixed by now (no dead end).
                store.problems.append(
                    f"failed earlier ({instance.status_message or 'no reason kept'})")
                continue
            if instance.docker_host not in reality:
                continue
            store.problems += _compare(config, with_target(config, instance),
                                       reality[instance.docker_host].get(instance.container_name),
                                       vhosts if instance.docker_host in local_hosts else None)
    for host, containers in reality.items():
        drift.unknown_containers += [(host, name, info["state"]) for name, info in
                                     containers.items() if (host, name) not in known]
    edge = next((h.edge for h in docker_hosts.load_hosts(config) if h.name in local_hosts),
                None)
    drift.extra_vhosts = [(edge, str(path)) for fqdn, (_, path)
                          in vhosts.items() if fqdn not in owned_vhosts]
    return drift


def _compare(config: Config, target, container: dict | None,
             vhosts: dict[str, tuple[str, Path]] | None) -> list[str]:
    problems = []
    should_run = target.state == StoreState.RUNNING
    if container is None:
        problems.append("container missing")
    else:
        if (container["state"] == "running") != should_run:
            problems.append(f"container {container['state']}, should be {target.state}")
        if target.image and container.get("image") and container["image"] != target.image:
            problems.append(f"image {container['image']}, should be {target.image}")
    if vhosts is not None:
        vhost = vhosts.get(config.store_host(target.name))
        if vhost is None:
            problems.append("vhost missing")
        elif vhost[0] != target.vhost:
            problems.append(f"vhost {vhost[0]}, should be {target.vhost}")
    return problems


def report_lines(drift: Drift, stores: bool = True) -> list[str]:
    """What `sync --check` prints (`stores=False`: what is not a store's)."""
    lines = []
    for store in drift.stores if stores else ():
        if store.problems:
            held = " (held by an admin: sync leaves it)" if store.held else ""
            lines.append(f"{store.subdomain} on {store.docker_host}: "
                         f"{'; '.join(store.problems)}{held}")
    lines += [f"{name} on {host}: ours by label, unknown to the DB ({state})"
              for host, name, state in drift.unknown_containers]
    lines += [f"{path} on {host}: vhost of this installation, no live store"
              for host, path in drift.extra_vhosts]
    lines += [f"not checked: {text}" for text in drift.unchecked]
    return lines
