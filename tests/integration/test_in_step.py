"""A run over many stores leaves the stores that need nothing alone: each Docker
host checks all of its stores in one call (container, data dir, health) and each
nginx host its vhosts (the rendering on disk, loaded by nginx), and only the
stores with a difference go through the roles, which put it right."""

from __future__ import annotations

import json

from pony.orm import db_session

from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import of_instance
from provisioner.models import Instance
from tests.integration.conftest import docker, https_request, inspect
from tests.integration.test_operations import provision

CONTAINER_TASK = "Ensure the store's container is started."
NAMES = ("step-same", "step-vhost", "step-stopped", "step-renamed")


def converge_all(service):
    with db_session:
        stores = [of_instance(service.config, Instance.get(subdomain=n, live=True)) for n in NAMES]
    result = operations.run(service.config, Operation.PROVISION, stores)
    ran = {}
    for path in (result.artifact_dir / "job_events").glob("*.json"):
        data = json.loads(path.read_text()).get("event_data") or {}
        if data.get("task") == CONTAINER_TASK and data.get("host"):
            ran[data["host"]] = True
    return result, set(ran)


def vhost(service, name):
    return service.config.nginx_config_dir / f"{name}.stores.test.conf"


def test_only_the_stores_that_differ_go_through_the_roles(service):
    provision(service, *NAMES)
    service.paused.set()
    try:
        ids = {n: inspect(f"ebuilder_{n}")["Id"] for n in NAMES}
        result, ran = converge_all(service)
        assert {n: (h.ok, h.changed) for n, h in result.hosts.items()} == \
            {n: (True, 0) for n in NAMES}, result.hosts
        assert ran == set(), "the roles ran for stores that needed nothing"

        rendered = vhost(service, "step-vhost").read_text()
        vhost(service, "step-vhost").write_text(rendered + "# edited by hand\n")
        docker("stop", "ebuilder_step-stopped")
        with db_session:
            Instance.get(subdomain="step-renamed", live=True).site_name = "Renamed Shop"

        result, ran = converge_all(service)
        assert all(h.ok for h in result.hosts.values()), result.hosts
        assert ran == {"step-vhost", "step-stopped", "step-renamed"}
        assert not result.hosts["step-same"].changed
        assert vhost(service, "step-vhost").read_text() == rendered
        assert inspect("ebuilder_step-stopped")["State"]["Running"]
        env = inspect("ebuilder_step-renamed")["Config"]["Env"]
        assert "SITE_NAME=Renamed Shop" in env
        assert inspect("ebuilder_step-same")["Id"] == ids["step-same"]
        for name in NAMES:
            assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200

        with db_session:
            stores = [of_instance(service.config, Instance.get(subdomain="step-same", live=True))]
        everything = operations.run(service.config, Operation.PROVISION, stores,
                                    extra_vars={"provision_every_store": True})
        assert everything.hosts["step-same"].ok
        assert any(json.loads(p.read_text()).get("event_data", {}).get("task") == CONTAINER_TASK
                   for p in (everything.artifact_dir / "job_events").glob("*.json")), \
            "provision_every_store=true did not run the roles"
    finally:
        service.paused.clear()


VHOSTS = ("vh-a", "vh-b", "vh-c")
RENDER_TASK = "Render the vhost."
RELOAD_TASK = "Reload nginx."


def regenerate(service, **extra_vars):
    """Operation.NGINX over VHOSTS, and the stores each task ran for."""
    with db_session:
        stores = [of_instance(service.config, Instance.get(subdomain=n, live=True)) for n in VHOSTS]
    result = operations.run(service.config, Operation.NGINX, stores, extra_vars=extra_vars)
    assert all(h.ok for h in result.hosts.values()), result.hosts
    ran: dict[str, set] = {}
    for path in (result.artifact_dir / "job_events").glob("*.json"):
        event = json.loads(path.read_text())
        data = event.get("event_data") or {}
        if event.get("event") == "runner_on_ok" and data.get("host"):
            ran.setdefault(data.get("task"), set()).add(data["host"])
    return result, ran


def test_a_vhost_run_renders_only_what_differs_and_still_prunes_once_per_host(service):
    provision(service, *VHOSTS)
    service.paused.set()
    try:
        result, ran = regenerate(service)
        # One store stays for the host's removals and reload; nothing to reload.
        assert len(ran.get(RENDER_TASK, set())) == 1, ran.get(RENDER_TASK)
        assert RELOAD_TASK not in ran
        assert not any(h.changed for h in result.hosts.values())

        edited = vhost(service, "vh-b")
        rendered = edited.read_text()
        edited.write_text(rendered + "# edited by hand\n")
        gone = vhost(service, "vh-gone")
        gone.write_text(rendered.replace("vh-b.", "vh-gone."))
        result, ran = regenerate(service)
        assert ran.get(RENDER_TASK) == {"vh-b"}
        assert ran.get(RELOAD_TASK) == {"vh-b"}
        assert edited.read_text() == rendered
        assert not gone.exists() and not gone.with_name(gone.name + ".removed").exists()
        for name in VHOSTS:
            assert https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200

        result, ran = regenerate(service, nginx_every_vhost=True)
        assert ran.get(RENDER_TASK) == set(VHOSTS)
    finally:
        service.paused.clear()
