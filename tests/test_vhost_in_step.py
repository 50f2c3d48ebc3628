"""Which vhosts a run can leave alone (roles/nginx_site/filter_plugins/nginx_site.py):
only the rendering on disk, loaded by nginx, with no copy of it left over, on a host
whose catch-all nginx has loaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "roles" / "nginx_site" / "filter_plugins" / \
    "nginx_site.py"
_spec = importlib.util.spec_from_file_location("nginx_site_filters", PLUGIN)
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

STAMP, CATCHALL = ".nginx_site-reloaded", "+catchall.stores.test.conf"


def listing(files: dict[str, tuple[str, float]], stores: list[str], **extra) -> dict:
    return {"item": ["localhost", [{"name": s, "file": f"{s}.stores.test.conf",
                                    "checksum": f"sum-{s}"} for s in stores]],
            "files": [{"path": f"/etc/nginx/conf.d/{name}", "checksum": checksum, "mtime": mtime}
                      for name, (checksum, mtime) in files.items()], **extra}


def verdicts(files, stores, **extra):
    return filters.nginx_site_in_step([listing(files, stores, **extra)], STAMP, CATCHALL)


def test_a_vhost_is_in_step_only_as_rendered_and_loaded():
    files = {STAMP: ("", 100.0), CATCHALL: ("c", 50.0),
             "same.stores.test.conf": ("sum-same", 90.0),
             "edited.stores.test.conf": ("sum-other", 90.0),
             "fresh.stores.test.conf": ("sum-fresh", 101.0),
             "copied.stores.test.conf": ("sum-copied", 90.0),
             "copied.stores.test.conf.removed": ("x", 90.0)}
    assert verdicts(files, ["same", "edited", "fresh", "copied", "gone"]) == {
        "same": "", "edited": "vhost differs", "fresh": "vhost not reloaded yet",
        "copied": "a copy of the vhost is left over", "gone": "vhost missing"}


def test_no_store_is_in_step_where_nginx_has_not_loaded_the_host():
    same = {"same.stores.test.conf": ("sum-same", 90.0)}
    never_reloaded = {CATCHALL: ("c", 50.0), **same}
    new_catchall = {STAMP: ("", 100.0), CATCHALL: ("c", 120.0), **same}
    for files in (never_reloaded, new_catchall):
        assert verdicts(files, ["same"]) == \
            {"same": "nginx has not loaded this host's configuration"}
    assert verdicts({}, ["same"], failed=True, msg="permission denied") == \
        {"same": "vhosts not listed: permission denied"}


def test_stores_are_grouped_by_nginx_host_in_play_order():
    hostvars = {
        "a": {"nginx_site_rendered": {"host": "h1", "name": "a.conf"},
              "nginx_site_pruned": [{"name": "old.conf"}]},
        "b": {"nginx_site_rendered": {"host": "h2", "name": "b.conf"}},
        "c": {"nginx_site_rendered": {"host": "h1", "name": "c.conf"}},
        "d": {"nginx_site_rendered": {}},  # its run's vhosts were forgotten
    }
    groups = filters.nginx_site_groups(hostvars, ["c", "a", "b", "d"])
    assert {host: g["stores"] for host, g in groups.items()} == {"h1": ["c", "a"], "h2": ["b"]}
    assert [r["name"] for r in groups["h1"]["rendered"]] == ["c.conf", "a.conf"]
    assert groups["h1"]["pruned"] == [{"name": "old.conf"}]



def test_a_vhost_run_ends_the_in_step_stores_but_one_per_host_whose_every_store_is():
    left = filters.nginx_site_left_alone(
        [["a", "b", "c"], ["d", "e", "f"], ["g"]],
        {"a": "", "b": "", "c": "", "d": "", "e": "vhost differs", "f": "",
         "g": "vhosts not listed"})
    # The first host's first store stays to prune and reload; on the second, e goes
    # through the role; the third could not be listed.
    assert left == ["b", "c", "d", "f"]
