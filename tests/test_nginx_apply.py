"""nginx_site's render and apply with real ansible-playbook runs (playbooks/nginx.yml and
destroy's vhost removal), against a stand-in nginx whose whole-configuration test can be
made to fail: each vhost validated alone, one test and reload per host, full rollback."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from provisioner.ansible.runner import run_playbook
from provisioner.ansible.store_vars import StoreVars

# Validation of one vhost (-c <wrapper>) passes; the whole configuration (-c main.conf)
# fails while any vhost names the store "breaker"; every call is logged.
FAKE_NGINX = """#!/bin/sh
echo "$*" >> {log}
if [ "$1 $2 $3" = "-c {main} -t" ] && grep -qs breaker {sites}/*.conf; then
    echo "nginx: [emerg] the whole configuration is broken by breaker" >&2
    exit 1
fi
exit 0
"""


@pytest.fixture
def nginx_project(ansible_project, tmp_path):
    sites, log, main = tmp_path / "sites", tmp_path / "nginx.log", tmp_path / "main.conf"
    sites.mkdir()
    fake = tmp_path / "nginx"
    fake.write_text(FAKE_NGINX.format(log=log, main=main, sites=sites))
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


def test_a_good_batch_is_tested_and_reloaded_once(nginx_project):
    config, sites, log = nginx_project
    result = run_playbook(config, "nginx.yml", [store("one"), store("two"), store("three")])
    assert all(h.ok for h in result.hosts.values()), result.hosts
    assert {p.name for p in sites.glob("*.conf")} == {
        "+catchall.stores.test.conf", "one.stores.test.conf", "two.stores.test.conf",
        "three.stores.test.conf"}
    main = str(config.nginx_main_conf)
    # Catch-all: one test, one reload; the three vhosts: one test, one reload.
    assert calls(log, "-c", main, "-t", "-q") == 2
    assert calls(log, "-c", main, "-s", "reload") == 2
    again = run_playbook(config, "nginx.yml", [store("one"), store("two"), store("three")])
    assert all(h.ok and h.changed == 0 for h in again.hosts.values()), again.hosts
    assert calls(log, "-c", main, "-s", "reload") == 2


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
    assert calls(log, "-c", str(config.nginx_main_conf), "-s", "reload") == 2  # none now


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
