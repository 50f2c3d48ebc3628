"""health.yml judges every store in one pass (playbooks/filter_plugins/store_health.py):
each store's verdict from its Docker host's container listing and its page through
nginx, with the role's rule for which container is ours."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "playbooks" / "filter_plugins" / "store_health.py"
_spec = importlib.util.spec_from_file_location("store_health", PLUGIN)
store_health = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store_health)

US = "inst-us"


def store(name: str, instance_id: int, engine: str = "localhost", edge: str = "localhost",
          root: str = "/srv/ebuilder/customers") -> dict:
    """A store's variables as the filters read them: its health_store fact
    (tasks/where_stores_live.yml) and the role's own names."""
    return {"health_store": {"docker_host": engine, "edge": edge,
                             "fqdn": f"{name}.stores.test",
                             "data_dir": f"{root}/{instance_id}"},
            "ebuilder_instance_subdomain": name, "ebuilder_instance_id": instance_id,
            "ebuilder_instance_installation_id": US}


def container(name: str, instance_id: int, state: str = "running", **labels) -> dict:
    return {"Names": [f"/ebuilder_{name}"], "State": state,
            "Labels": {"ebuilder.managed": "true", "ebuilder.instance_id": str(instance_id),
                       "ebuilder.installation": US, **labels}}


def test_each_store_gets_its_own_verdict():
    hostvars = {"ok": store("ok", 1), "down": store("down", 2), "gone": store("gone", 3),
                "theirs": store("theirs", 4), "old": store("old", 5), "blank": store("blank", 6),
                "far": store("far", 7, engine="h2")}
    old = container("old", 5)
    del old["Labels"]["ebuilder.installation"]
    listings = {"results": [
        {"item": "localhost", "containers": [
            container("ok", 1), container("down", 2, state="exited"),
            container("theirs", 4, **{"ebuilder.installation": "inst-other"}), old,
            container("blank", 6)]},
        {"item": "h2", "failed": True, "msg": "Error connecting: refused"}]}
    pages = {"results": [{"item": "localhost", "pages": {
        "ok": {"status": 200}, "down": {"status": 502}, "gone": {"status": 404},
        "theirs": {"status": 200}, "old": {"status": 200}}}]}
    verdicts = store_health.health_verdicts(hostvars, list(hostvars), listings, pages)
    assert verdicts == {
        "ok": "",
        "down": "unhealthy: container exited, HTTP 502",
        "gone": "unhealthy: container missing, HTTP 404",
        "theirs": "unhealthy: container not ours (installation inst-other), HTTP 200",
        "old": "",
        "blank": "unhealthy: container running, HTTP -1",
        "far": "unhealthy: cannot read containers on h2: Error connecting: refused",
    }


def test_containers_are_read_on_the_docker_host_and_pages_on_the_edge():
    hostvars = {"near": store("near", 1), "far": store("far", 2, engine="h2"),
                "own-edge": store("own-edge", 3, engine="h2", edge="edge-2")}
    assert store_health.health_targets(hostvars, list(hostvars)) == {
        "localhost": {"near": "near.stores.test"},
        "h2": {"far": "far.stores.test", "own-edge": "own-edge.stores.test"}}
    assert store_health.health_targets(hostvars, list(hostvars), "edge") == {
        "localhost": {"near": "near.stores.test", "far": "far.stores.test"},
        "edge-2": {"own-edge": "own-edge.stores.test"}}
    listings = {"results": [
        {"item": "localhost", "containers": [container("near", 1)]},
        {"item": "h2", "containers": [container("far", 2), container("own-edge", 3)]}]}
    pages = {"results": [
        {"item": "localhost", "pages": {"near": {"status": 200}, "far": {"status": 200}}},
        {"item": "edge-2", "pages": {"own-edge": {"status": 503}}}]}
    assert store_health.health_verdicts(hostvars, list(hostvars), listings, pages) == {
        "near": "", "far": "", "own-edge": "unhealthy: container running, HTTP 503"}


def test_disk_usage_maps_each_hosts_du_lines_to_its_stores():
    hostvars = {"a": store("a", 1, root="/data"),
                "b": store("b", 2, engine="host2"), "c": store("c", 3, engine="host2")}
    targets = store_health.disk_targets(hostvars, ["a", "b", "c"])
    assert targets == {"localhost": {"/data/1": "a"},
                       "host2": {"/srv/ebuilder/customers/2": "b",
                                 "/srv/ebuilder/customers/3": "c"}}
    measured = {"results": [
        {"item": "localhost", "stdout": "2048\t/data/1\n"},
        # du exits 1 when a dir is gone: the others it measured still count.
        {"item": "host2", "rc": 1, "stdout": "5\t/srv/ebuilder/customers/3\n"
                                             "9\t/somewhere/else\nnonsense"}]}
    assert store_health.disk_usage(targets, measured) == {"a": 2.0, "c": 0.0}
