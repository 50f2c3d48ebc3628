"""nginx_site's render and apply with real ansible-playbook runs (playbooks/nginx.yml and
destroy's vhost removal), against a stand-in nginx whose whole-configuration test can be
made to fail and which can be stopped: each vhost validated alone, one test and reload per
host, full rollback; what a killed run left on disk is reloaded by the next run; vhosts of
stores that are gone are pruned."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from provisioner.ansible.runner import run_playbook
from provisioner.ansible.store_vars import StoreVars

# Validation of one vhost (-c <wrapper>) passes; the whole configuration (-c main.conf)
# fails while any vhost names the store "breaker", naming that file as nginx does; a reload
# fails as real nginx's does while the file "stopped" exists; every call is logged.
FAKE_NGINX = """#!/bin/sh
echo "$*" >> {log}
broken=$(grep -ls breaker {sites}/*.conf | head -n 1)
if [ "$1 $2 $3" = "-c {main} -t" ] && [ -n "$broken" ]; then
    echo "nginx: [emerg] the whole configuration is broken by breaker in $broken:1" >&2
    exit 1
fi
if [ "$3 $4" = "-s reload" ] && [ -e {stopped} ]; then
    echo 'nginx: [error] open() "{pid}" failed (2: No such file or directory)' >&2
    exit 1
fi
exit 0
"""

# What a run killed (kill -9) between writing the vhosts and nginx's reload leaves behind:
# the render step done, nothing after it.
KILLED_RUN = """---
- name: Write the vhosts, then die before the reload
  hosts: stores
  gather_facts: false
  vars:
    nginx_site_state: "{{ store_vhost }}"
  tasks:
    - name: Render this store's vhost for its state.
      ansible.builtin.import_role:
        name: nginx_site
        tasks_from: render
"""


@pytest.fixture
def nginx_project(ansible_project, tmp_path):
    sites, log, main = tmp_path / "sites", tmp_path / "nginx.log", tmp_path / "main.conf"
    sites.mkdir()
    fake = tmp_path / "nginx"
    fake.write_text(FAKE_NGINX.format(log=log, main=main, sites=sites,
                                      stopped=tmp_path / "stopped", pid=tmp_path / "nginx.pid"))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    config = dataclasses.replace(ansible_project, nginx_bin=str(fake), nginx_main_conf=str(main),
                                 nginx_config_dir=sites, nginx_https_listen="127.0.0.1:1")
    return config, sites, log


def store(name: str, state: str = "running", vhost: str = "present") -> dict:
    return StoreVars(name=name, instance_id=name, site_name=name, admin_email="a@b.io",
                     port=19300, docker_host="localhost", state=state, vhost=vhost).as_dict()


def calls(log: Path, *args: str) -> int:
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(1 for line in lines if line.split()[:len(args)] == list(args))


def reloads(config, log: Path) -> int:
    return calls(log, "-c", str(config.nginx_main_conf), "-s", "reload")


def whole_config_tests(config, log: Path) -> int:
    return calls(log, "-c", str(config.nginx_main_conf), "-t", "-q")


def killed_run(config, stores: list[dict]) -> None:
    """Write the stores' vhosts the way the role does, then stop before any reload."""
    (config.playbooks_dir / "killed.yml").write_text(KILLED_RUN)
    result = run_playbook(config, "killed.yml", stores)
    assert all(h.ok for h in result.hosts.values()), result.hosts


def all_ok(result) -> bool:
    return bool(result.hosts) and all(h.ok for h in result.hosts.values())


def test_a_good_batch_is_tested_and_reloaded_once(nginx_project):
    config, sites, log = nginx_project
    result = run_playbook(config, "nginx.yml", [store("one"), store("two"), store("three")])
    assert all(h.ok for h in result.hosts.values()), result.hosts
    assert {p.name for p in sites.glob("*.conf")} == {
        "+catchall.stores.test.conf", "one.stores.test.conf", "two.stores.test.conf",
        "three.stores.test.conf"}
    main = str(config.nginx_main_conf)
    # The catch-all and the three vhosts: one test, one reload.
    assert calls(log, "-c", main, "-t", "-q") == 1
    assert calls(log, "-c", main, "-s", "reload") == 1
    again = run_playbook(config, "nginx.yml", [store("one"), store("two"), store("three")])
    assert all(h.ok and h.changed == 0 for h in again.hosts.values()), again.hosts
    assert calls(log, "-c", main, "-s", "reload") == 1


def test_a_rejected_whole_configuration_puts_every_vhost_back(nginx_project):
    config, sites, log = nginx_project
    first = run_playbook(config, "nginx.yml", [store("keep")])
    assert first.hosts["keep"].ok
    kept = (sites / "keep.stores.test.conf").read_text()
    result = run_playbook(config, "nginx.yml", [store("keep", vhost="suspended"),
                                                store("breaker"), store("fresh")])
    assert not any(h.ok for h in result.hosts.values()), result.hosts
    for outcome in result.hosts.values():
        assert "nginx -t rejected the configuration on localhost" in outcome.error
        assert "broken by breaker" in outcome.error
    assert (sites / "keep.stores.test.conf").read_text() == kept  # the old one, back
    assert not (sites / "breaker.stores.test.conf").exists()
    assert not (sites / "fresh.stores.test.conf").exists()
    assert not list(sites.glob("*~")) and not list(sites.glob("*.removed"))
    assert calls(log, "-c", str(config.nginx_main_conf), "-s", "reload") == 1  # none now


def test_a_removed_vhost_comes_back_when_nginx_rejects_the_result(nginx_project):
    config, sites, log = nginx_project
    (sites / "breaker.stores.test.conf").write_text("# breaker, already there\n")
    assert run_playbook(config, "nginx.yml", [store("leaving")]).hosts["leaving"].ok is False
    (sites / "breaker.stores.test.conf").unlink()
    assert run_playbook(config, "nginx.yml", [store("leaving")]).hosts["leaving"].ok
    (sites / "breaker.stores.test.conf").write_text("# breaker, already there\n")
    gone = run_playbook(config, "nginx.yml", [store("leaving", vhost="absent")])
    assert not gone.hosts["leaving"].ok
    assert (sites / "leaving.stores.test.conf").exists(), "the removed vhost was not put back"
    assert not (sites / "leaving.stores.test.conf.removed").exists()


def test_what_a_killed_run_left_is_reloaded_once_by_the_next_run(nginx_project):
    config, sites, log = nginx_project
    assert all_ok(run_playbook(config, "nginx.yml", [store("one"), store("two"),
                                                     store("leaving")]))
    before = reloads(config, log)
    killed_run(config, [store("one", vhost="suspended"), store("leaving", vhost="absent")])
    assert "(suspended)" in (sites / "one.stores.test.conf").read_text()
    assert not (sites / "leaving.stores.test.conf").exists()
    assert (sites / "leaving.stores.test.conf.removed").exists()
    assert reloads(config, log) == before
    # The retry renders the same files ("unchanged"), but nginx never loaded them.
    batch = [store("one", vhost="suspended"), store("two"), store("leaving", vhost="absent")]
    retry = run_playbook(config, "nginx.yml", batch)
    assert all_ok(retry), retry.hosts
    assert reloads(config, log) == before + 1
    assert not list(sites.glob("*~")) and not list(sites.glob("*.removed"))
    # Now live: nothing is newer than the last good reload, so no reload.
    again = run_playbook(config, "nginx.yml", batch)
    assert all(h.ok and h.changed == 0 for h in again.hosts.values()), again.hosts
    assert reloads(config, log) == before + 1


def test_a_foreign_broken_file_is_named_and_nothing_of_ours_is_half_applied(nginx_project):
    config, sites, log = nginx_project
    assert all_ok(run_playbook(config, "nginx.yml", [store("one"), store("gone")]))
    gone = (sites / "gone.stores.test.conf").read_text()
    killed_run(config, [store("one", vhost="suspended")])
    foreign = sites / "zz-foreign.conf"
    foreign.write_text("breaker directive nginx does not know;\n")
    before = reloads(config, log)
    failed = run_playbook(config, "nginx.yml", [store("one", vhost="suspended")])
    error = failed.hosts["one"].error or ""
    assert not failed.hosts["one"].ok
    assert "nginx -t rejected the configuration on localhost" in error
    assert f"{foreign}:1" in error
    assert reloads(config, log) == before
    assert foreign.exists(), "a file that is not ours was touched"
    # The pruned vhost is back; the one a killed run wrote (valid alone) waits for a reload.
    assert (sites / "gone.stores.test.conf").read_text() == gone
    assert "(suspended)" in (sites / "one.stores.test.conf").read_text()
    assert not list(sites.glob("*.removed"))
    foreign.unlink()
    retry = run_playbook(config, "nginx.yml", [store("one", vhost="suspended")])
    assert all_ok(retry), retry.hosts
    assert reloads(config, log) == before + 1
    assert not (sites / "gone.stores.test.conf").exists()


def test_a_stopped_nginx_fails_clearly_and_the_retry_reloads_once_it_runs(nginx_project):
    config, sites, log = nginx_project
    assert all_ok(run_playbook(config, "nginx.yml", [store("one"), store("two")]))
    stopped = log.parent / "stopped"
    stopped.touch()
    batch = [store("one", vhost="suspended"), store("two")]
    failed = run_playbook(config, "nginx.yml", batch)
    outcome = failed.hosts["one"]
    assert not outcome.ok
    assert "nginx is not running on localhost (no pid file)" in (outcome.error or "")
    assert str(log.parent / "nginx.pid") in outcome.error
    assert failed.hosts["two"].ok, "an unchanged store that nginx serves failed"
    # nginx -t passed: the new vhost stays in place for the next reload, no backup left.
    assert "(suspended)" in (sites / "one.stores.test.conf").read_text()
    assert not list(sites.glob("*~")) and not list(sites.glob("*.removed"))
    stopped.unlink()
    before = reloads(config, log)
    retry = run_playbook(config, "nginx.yml", batch)
    assert all_ok(retry), retry.hosts
    assert reloads(config, log) == before + 1


def test_nginx_yml_removes_our_vhosts_of_gone_stores_and_nothing_else(nginx_project, config):
    project, sites, log = nginx_project
    assert all_ok(run_playbook(project, "nginx.yml", [store("one"), store("two"),
                                                      store("three")]))
    other = sites / "other.stores.test.conf"
    other.write_text("# ebuilder-installation: someone-else\nserver {}\n")
    plain = sites / "plain.stores.test.conf"
    plain.write_text("server {}\n")
    similar = sites / "similar.stores.test.conf"
    similar.write_text(f"# ebuilder-installation: {config.installation_id}x\nserver {{}}\n")
    reloads_before, tests_before = reloads(project, log), whole_config_tests(project, log)
    result = run_playbook(project, "nginx.yml", [store("one")])
    assert all_ok(result), result.hosts
    assert {p.name for p in sites.glob("*.conf")} == {
        "+catchall.stores.test.conf", "one.stores.test.conf", other.name, plain.name,
        similar.name}
    assert not list(sites.glob("*.removed"))
    assert reloads(project, log) == reloads_before + 1
    assert whole_config_tests(project, log) == tests_before + 1
