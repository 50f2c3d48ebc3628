"""nginx_site recovers, on the real nginx of the test stack, from what a crash or a foreign
hand left: a vhost a killed run wrote but never reloaded, a foreign broken file, a stopped
nginx, a vhost whose store is gone. Each case runs the service's own path (the maintenance
function behind `provisioner nginx`, or operations.run as the worker does)."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from pathlib import Path

from pony.orm import db_session

from provisioner import maintenance
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars, with_target
from provisioner.models import Instance
from provisioner.testing import stripe_events
from provisioner.testing.stack import LocalNginx
from tests.integration.conftest import https_request, poll, wait_until_live


def provision(service, name: str) -> None:
    for evt in stripe_events.signup(subdomain=name, site_name=name.title(),
                                    email=f"{name}@example.com"):
        service.post_event(evt)
    wait_until_live(name)


def stores_of(config, name: str) -> list[StoreVars]:
    with db_session:
        return [with_target(config, Instance.get(subdomain=name, live=True))]


@contextlib.contextmanager
def worker_paused(service):
    """The service's worker has ended its current run and claims nothing new: meanwhile
    nothing but the test writes vhosts or reloads nginx."""
    service.paused.set()
    try:
        yield
    finally:
        service.paused.clear()


def status_through(nginx: LocalNginx, name: str) -> int:
    return https_request(nginx, f"{name}.stores.test", "/health/")[0]


def reload_behind_our_back(nginx: LocalNginx) -> None:
    """Reload, and return once only workers of the new configuration accept: until
    then an old worker may still answer a new connection as before the reload."""
    subprocess.run([nginx.nginx_bin, "-c", str(nginx.conf), "-e", str(nginx.root / "error.log"),
                    "-s", "reload"], check=True, capture_output=True)
    master = int((nginx.root / "nginx.pid").read_text())

    def workers() -> list[bytes]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int(
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                    found.append((entry / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                continue
        return found
    # worker_processes 1 (LocalNginx): one worker, and it is not an old one shutting down.
    poll(lambda: (lambda w: len(w) == 1 and b"shutting down" not in w[0])(workers()),
         timeout=30, what="nginx's old worker to leave after the reload")


def vhost_a_killed_run_left(service, name: str):
    """nginx runs without the store's vhost while the file the role writes is on disk:
    what a run killed (-9) between writing the vhost and the reload leaves."""
    vhost = service.nginx.sites / f"{name}.stores.test.conf"
    written = vhost.read_text()
    vhost.unlink()
    reload_behind_our_back(service.nginx)
    poll(lambda: status_through(service.nginx, name) == 404, timeout=30,
         what=f"nginx without {name}'s vhost")
    vhost.write_text(written)
    return vhost, written


def test_a_vhost_a_killed_run_wrote_goes_live_with_the_next_run(service):
    provision(service, "crashed-shop")
    with worker_paused(service):
        vhost_a_killed_run_left(service, "crashed-shop")
        assert status_through(service.nginx, "crashed-shop") == 404
        report = maintenance.regenerate_vhosts(service.config)
    assert not report.failed, report.lines
    poll(lambda: status_through(service.nginx, "crashed-shop") == 200, timeout=30,
         what="crashed-shop through nginx after the next run")


def test_a_foreign_broken_file_is_named_and_the_retry_after_its_removal_goes_live(service):
    provision(service, "foreign-shop")
    foreign = service.nginx.sites / "zz-foreign.conf"
    stores = stores_of(service.config, "foreign-shop")
    with worker_paused(service), contextlib.ExitStack() as cleanup:
        vhost, written = vhost_a_killed_run_left(service, "foreign-shop")
        foreign.write_text("server {\n    no_such_directive on;\n}\n")
        cleanup.callback(foreign.unlink, missing_ok=True)
        failed = operations.run(service.config, Operation.NGINX, stores)
        outcome = failed.hosts["foreign-shop"]
        assert not outcome.ok
        # nginx -t's own words reach the store: the file and the line.
        assert "nginx -t rejected the configuration on localhost" in outcome.error
        assert f'unknown directive "no_such_directive" in {foreign}:2' in outcome.error
        assert vhost.read_text() == written
        assert not list(service.nginx.sites.glob("*~"))
        assert status_through(service.nginx, "foreign-shop") == 404
        foreign.unlink()
        retry = operations.run(service.config, Operation.NGINX, stores)
    assert retry.hosts["foreign-shop"].ok, retry.hosts
    poll(lambda: status_through(service.nginx, "foreign-shop") == 200, timeout=30,
         what="foreign-shop through nginx after the retry")


def test_a_stopped_nginx_fails_clearly_and_the_retry_once_it_runs_succeeds(service, tmp_path):
    provision(service, "stopped-shop")
    own = LocalNginx(tmp_path / "nginx", base_domain="stores.test").start()
    own.stop()
    poll(lambda: not own.running(), timeout=30, what="our own nginx stopped")
    config = dataclasses.replace(
        service.config, nginx_config_dir=own.sites, nginx_main_conf=str(own.conf),
        nginx_http_listen=f"127.0.0.1:{own.http_port}",
        nginx_https_listen=f"127.0.0.1:{own.https_port}",
        wildcard_ssl_cert=str(own.cert), wildcard_ssl_key=str(own.key))
    stores = stores_of(config, "stopped-shop")
    try:
        failed = operations.run(config, Operation.NGINX, stores)
        error = failed.hosts["stopped-shop"].error or ""
        assert not failed.hosts["stopped-shop"].ok
        # nginx -t leaves an empty pid file where there was none: nginx's words name it.
        assert "nginx is not running on localhost (empty pid file)" in error
        assert f'invalid PID number "" in "{own.root / "nginx.pid"}"' in error
        # nginx -t accepted it: the vhost waits on disk for the next reload.
        assert (own.sites / "stopped-shop.stores.test.conf").exists()
        own.start()
        retry = operations.run(config, Operation.NGINX, stores)
        assert retry.hosts["stopped-shop"].ok, retry.hosts
        assert status_through(own, "stopped-shop") == 200
    finally:
        own.stop()


def test_provisioner_nginx_removes_our_vhost_of_a_store_that_is_gone_and_nothing_else(service):
    provision(service, "kept-shop")
    sites = service.nginx.sites
    ours = sites / "kept-shop.stores.test.conf"
    gone = sites / "gone-shop.stores.test.conf"
    other = sites / "other-shop.stores.test.conf"
    with worker_paused(service):
        gone.write_text(ours.read_text().replace("kept-shop.", "gone-shop."))
        other.write_text(ours.read_text().replace("kept-shop.", "other-shop.").replace(
            f"ebuilder-installation: {service.config.installation_id}",
            "ebuilder-installation: someone-else"))
        reload_behind_our_back(service.nginx)
        poll(lambda: status_through(service.nginx, "gone-shop") == 200, timeout=30,
             what="the gone store's vhost live")
        report = maintenance.regenerate_vhosts(service.config)
    assert not report.failed, report.lines
    assert not gone.exists() and not gone.with_name(gone.name + ".removed").exists()
    assert ours.exists() and other.exists()
    poll(lambda: status_through(service.nginx, "gone-shop") == 404, timeout=30,
         what="the gone store's vhost gone from nginx")
    assert status_through(service.nginx, "kept-shop") == 200
    assert status_through(service.nginx, "other-shop") == 200
