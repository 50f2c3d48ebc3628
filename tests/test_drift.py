"""Drift between the DB and Docker/nginx, judged store by store (the integration test
removes containers and vhosts for real and runs `sync --check` then `sync`)."""

from __future__ import annotations

import dataclasses

from pony.orm import db_session, flush

from provisioner import drift, maintenance
from provisioner.ansible.store_vars import with_target
from provisioner.models import Instance, Job


def target(config, **fields):
    with db_session:
        instance = Instance(subdomain="janes-shop", site_name="J", admin_email="j@example.com",
                            port=19130, status="running", desired_state="running", **fields)
        flush()
        return with_target(config, instance)


def test_a_store_as_it_should_be_has_no_problem(config):
    store = target(config)
    container = {"state": "running", "image": config.ebuilder_image}
    vhosts = {"janes-shop.stores.test": ("present", "/x.conf")}
    assert drift._compare(config, store, container, vhosts) == []


def test_each_difference_is_named(config):
    store = target(config, image="ebuilder:2")
    vhosts = {"janes-shop.stores.test": ("suspended", "/x.conf")}
    assert drift._compare(config, store, {"state": "exited", "image": "ebuilder:1"},
                          vhosts) == ["container exited, should be running",
                                      "image ebuilder:1, should be ebuilder:2",
                                      "vhost suspended, should be present"]
    assert drift._compare(config, store, None, {}) == ["container missing", "vhost missing"]
    # Vhosts of a host that is not this machine are not judged.
    assert drift._compare(config, store, None, None) == ["container missing"]


def test_a_held_store_should_be_stopped_and_keeps_its_vhost(config):
    store = target(config, admin_hold=True)
    vhosts = {"janes-shop.stores.test": ("present", "/x.conf")}
    assert drift._compare(config, store, {"state": "exited", "image": config.ebuilder_image},
                          vhosts) == []
    assert drift._compare(config, store, {"state": "running", "image": config.ebuilder_image},
                          vhosts) == ["container running, should be stopped"]


def test_only_this_installations_vhosts_are_read(config, tmp_path):
    local = dataclasses.replace(config, nginx_config_dir=tmp_path)
    (tmp_path / "ours.stores.test.conf").write_text(
        f"# managed\n# ebuilder-installation: {config.installation_id}\n"
        f"# eBuilder store ours.stores.test (closed)\n")
    (tmp_path / "theirs.stores.test.conf").write_text(
        "# ebuilder-installation: someone-else\n# eBuilder store theirs.stores.test (present)\n")
    (tmp_path / "hand-made.conf").write_text("server { listen 80; }\n")
    assert drift._vhosts(local) == {"ours.stores.test": ("closed",
                                                         tmp_path / "ours.stores.test.conf")}


def test_check_reports_and_changes_nothing(config):
    with db_session:
        Instance(subdomain="stuck-shop", site_name="s", admin_email="s@example.com",
                 port=19119, status="failed", desired_state="running",
                 status_message="docker unreachable")
    report = maintenance.sync(config, check=True)
    assert "stuck-shop on localhost: failed earlier (docker unreachable)" in report.lines
    assert report.counts["drifted"] == 1
    with db_session:
        assert Instance.get(subdomain="stuck-shop").status == "failed"
        assert not Job.select().exists()

