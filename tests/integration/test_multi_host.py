"""Two real hosts reached over SSH behind one edge nginx: each a Linux network
namespace with its own address, sshd and Docker engine (scripts/netns-hosts.sh), the
edge the test's nginx in this namespace. Stores are provisioned on both, suspended,
moved from one to the other with their data, kept off a draining host and destroyed,
every step through SSH; the rig leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import timedelta

import pytest
import yaml
from pony.orm import db_session

from provisioner import admin, docker_facts, lifecycle
from provisioner.models import Instance, utcnow
from provisioner.testing import stripe_events
from provisioner.worker import Worker
from tests import netns_hosts
from tests.conftest import apply_events
from tests.integration.conftest import https_request
from tests.integration.test_netns_rig import check_machine, leftovers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    check_machine()
    prefix = netns_hosts.new_prefix()
    state = tmp_path_factory.mktemp("rig")
    with netns_hosts.hosts(state, prefix) as hosts:
        yield hosts
    assert leftovers(prefix) == [], "the rig left something behind"


def write_inventory(path, rig, drain: str | None = None) -> None:
    inventory = netns_hosts.inventory(rig, sys.executable)
    if drain:
        inventory["all"]["children"]["docker_hosts"]["hosts"][drain]["provisioner_drain"] = True
    inventory["all"]["children"]["stores"] = {"hosts": {}}
    path.write_text(yaml.safe_dump(inventory))


@pytest.fixture
def fleet(service, rig, tmp_path):
    """The service's config with the two SSH hosts and this machine as the edge; this
    test drives its own worker."""
    inventory = tmp_path / "hosts.yml"
    write_inventory(inventory, rig)
    service.paused.set()
    try:
        yield dataclasses.replace(service.config, inventory_path=str(inventory))
    finally:
        service.paused.clear()


def converge(config, names, wanted=("running", "stopped", "suspended"), timeout=300):
    worker = Worker(config)
    deadline = time.monotonic() + timeout
    while True:
        worker.run_once()
        with db_session:
            states = {i.subdomain: i.status for i in Instance.select(lambda i: i.subdomain
                                                                     in names)}
        if all(states.get(n) in wanted for n in names):
            return states
        broken = [n for n, s in states.items() if s in ("failed", "needs_attention")
                  and s not in wanted]
        if broken:
            with db_session:
                said = [f"{n}: {Instance.get(subdomain=n).status_message}" for n in broken]
            raise AssertionError(f"stores failed: {said}")
        if time.monotonic() > deadline:
            raise AssertionError(f"stores not converged: {states}")
        time.sleep(0.2)


def containers(host: netns_hosts.Host) -> dict[str, str]:
    """name -> state of the store containers on a host, asked over SSH (its own engine)."""
    result = host.ssh("docker ps -a --format '{{.Names}} {{.State}}'")
    assert result.returncode == 0, result.stderr
    return dict(line.split() for line in result.stdout.splitlines()
                if line.startswith("ebuilder_"))


def store(name: str) -> Instance:
    return Instance.get(subdomain=name, live=True)


def page(service, name: str, path: str = "/media/page.txt") -> tuple[int, bytes]:
    return https_request(service.nginx, f"{name}.stores.test", path)


def serves_from(service, config, name: str, host: netns_hosts.Host,
                other: netns_hosts.Host) -> None:
    """The store runs on `host` alone, the DB says so, and its data answers through the
    edge."""
    assert page(service, name) == (200, b"travels with me\n")
    with db_session:
        assert store(name).docker_host == host.name
        assert docker_facts.live_health(config, store(name))["healthy"]
    assert containers(host).get(f"ebuilder_{name}") == "running"
    assert f"ebuilder_{name}" not in containers(other)


def test_stores_on_two_ssh_hosts_behind_one_edge_are_suspended_moved_drained_destroyed(
        service, rig, fleet, tmp_path):
    one, two = rig
    env = {"PROVISIONER_INVENTORY": str(fleet.inventory_file)}
    checked = service.cli("hosts", "--check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for host in rig:
        assert f"{host.name}: ansible: ok (reached over SSH)" in checked.stdout
        assert f"{host.name}: ports: ok" in checked.stdout

    # Placed by room: one store on each host, each behind the edge.
    for name in ("north-shop", "south-shop"):
        apply_events(fleet, stripe_events.signup(subdomain=name, site_name=name,
                                                 email=f"{name}@example.com"))
    converge(fleet, ["north-shop", "south-shop"])
    with db_session:
        placed = {n: (store(n).docker_host, store(n).port, store(n).id)
                  for n in ("north-shop", "south-shop")}
    assert sorted(h for h, _, _ in placed.values()) == sorted([one.name, two.name])
    by_name = {h.name: h for h in rig}
    for name, (host_name, port, _) in placed.items():
        host = by_name[host_name]
        assert containers(host).get(f"ebuilder_{name}") == "running"
        other = two if host is one else one
        assert f"ebuilder_{name}" not in containers(other)
        bindings = json.loads(host.ssh(
            f"docker inspect --format '{{{{json .HostConfig.PortBindings}}}}' "
            f"ebuilder_{name}").stdout)
        assert bindings["8000/tcp"][0]["HostIp"] == host.address
        vhost = (service.nginx.sites / f"{name}.stores.test.conf").read_text()
        assert f"proxy_pass http://{host.address}:{port};" in vhost
        assert page(service, name, "/health/")[0] == 200
        with db_session:
            assert docker_facts.live_health(fleet, store(name))["healthy"]

    # Suspended on its host: the edge shows the suspended page.
    south_host = by_name[placed["south-shop"][0]]
    with db_session:
        admin.queue_action(store("south-shop").id, "suspend", admin.Actor("test"))
    converge(fleet, ["south-shop"], wanted=("suspended",))
    assert containers(south_host)["ebuilder_south-shop"] == "exited"
    status, body = page(service, "south-shop", "/")
    assert status == 503 and b"suspended" in body.lower()

    # Moved with its data to the other host, through SSH; the old one is cleaned up.
    north_from = by_name[placed["north-shop"][0]]
    north_to = two if north_from is one else one
    north_id = placed["north-shop"][2]
    old_dir = f"{north_from.data_root}/{north_id}"
    assert north_from.ssh(f"echo 'travels with me' > {old_dir}/media/page.txt").returncode == 0
    assert page(service, "north-shop") == (200, b"travels with me\n")
    moved = service.cli("move", "north-shop", north_to.name, "--wait", env=env)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"moved north-shop from {north_from.name} to {north_to.name}" in moved.stdout
    serves_from(service, fleet, "north-shop", north_to, north_from)
    assert north_from.ssh(f"test -e {old_dir}").returncode != 0, "old data dir removed"
    vhost = (service.nginx.sites / "north-shop.stores.test.conf").read_text()
    assert f"proxy_pass http://{north_to.address}:{placed['north-shop'][1]};" in vhost

    # A move that fails on the new host (its port is taken there) leaves the store
    # serving where it was, and says why.
    port = placed["north-shop"][1]
    squatter = north_from.ssh(
        f"setsid python3 -m http.server --bind {north_from.address} {port} "
        f"</dev/null >/dev/null 2>&1 & echo $!")
    assert squatter.returncode == 0, squatter.stderr
    try:
        failed = service.cli("move", "north-shop", north_from.name, "--wait", env=env)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert f"stays on {north_to.name}" in failed.stderr
        serves_from(service, fleet, "north-shop", north_to, north_from)
    finally:
        north_from.ssh(f"kill {squatter.stdout.strip()}")

    # A draining host gets no new store, though it has the most room.
    emptier = north_from
    write_inventory(fleet.inventory_file, rig, drain=emptier.name)
    apply_events(fleet, stripe_events.signup(subdomain="late-shop", site_name="late",
                                             email="late-shop@example.com"))
    converge(fleet, ["late-shop"])
    with db_session:
        assert store("late-shop").docker_host == north_to.name
    assert page(service, "late-shop", "/health/")[0] == 200

    # Destroyed on its host: archived in that host's backup root, then removed.
    with db_session:
        late_id = store("late-shop").id
    cancel(fleet, "late-shop")
    converge(fleet, ["late-shop"], wanted=("cancelled",))
    with db_session:
        Instance[late_id].delete_after = utcnow() - timedelta(seconds=1)
        assert late_id in lifecycle.schedule_deletions()
    converge(fleet, ["late-shop"], wanted=("destroyed",))
    with db_session:
        archive = Instance[late_id].archive_path
    assert archive.startswith(f"{north_to.backup_root}/late-shop-{late_id}-")
    assert north_to.ssh(f"tar -tzf {archive} {late_id}/db/admin").returncode == 0
    assert north_to.ssh(f"test -e {north_to.data_root}/{late_id}").returncode != 0
    assert "ebuilder_late-shop" not in containers(north_to)
    assert page(service, "late-shop", "/")[0] == 404
    # The other stores are as they were.
    assert page(service, "north-shop") == (200, b"travels with me\n")
    assert page(service, "south-shop", "/")[0] == 503


def cancel(config, name: str) -> None:
    with db_session:
        instance = store(name)
        subscription = instance.subscription.stripe_id
        customer = instance.customer.stripe_id
    now = int(time.time())
    sub = stripe_events.resource("subscription")
    sub.update({"id": subscription, "customer": customer, "status": "canceled",
                "cancel_at": None, "canceled_at": now, "ended_at": now})
    apply_events(config, [stripe_events.event("customer.subscription.deleted", sub)])
