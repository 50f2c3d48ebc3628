"""Backups on real Docker and nginx: made consistent and verified, put back, refused
when corrupted, cloned into a new store; through the `provisioner` CLI."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta
from pathlib import Path

from pony.orm import db_session

from provisioner.models import Backup, CustomDomain, HealthCheck, Instance, utcnow
from tests.integration.conftest import docker, https_request, inspect, poll
from tests.integration.test_operations import provision


def data_dir(service, name: str) -> Path:
    with db_session:
        return service.config.customer_data_root / str(Instance.get(subdomain=name, live=True).id)


def page(service, name: str, path: str = "/media/page.txt") -> tuple[int, bytes]:
    return https_request(service.nginx, f"{name}.stores.test", path)


def backups_of(name: str) -> list[Backup]:
    with db_session:
        instance = Instance.get(subdomain=name, live=True)
        return list(instance.backups.order_by(Backup.id))


def test_backup_change_restore_gives_the_original_back_through_nginx(service):
    provision(service, "keep-shop")
    media = data_dir(service, "keep-shop") / "media" / "page.txt"
    media.write_text("original\n")
    assert page(service, "keep-shop") == (200, b"original\n")

    made = service.cli("backup", "keep-shop", "--wait")
    assert made.returncode == 0, made.stdout + made.stderr
    [backup] = backups_of("keep-shop")
    archive = Path(backup.path)
    assert backup.status == "ok" and backup.reason == "manual"
    assert backup.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    # sha256sum -c can check it without the provisioner.
    assert Path(f"{archive}.sha256").read_text() == f"{backup.sha256}  {archive.name}\n"
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    # The second location holds the same bytes.
    copy = Path(service.config.backup_copy_to) / archive.parent.name / archive.name
    assert backup.copy_path == str(copy)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == backup.sha256
    assert "backup (manual) made" in made.stdout and "pause" in made.stdout

    media.write_text("changed\n")
    assert page(service, "keep-shop") == (200, b"changed\n")
    restored = service.cli("restore", "keep-shop", "--wait")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert page(service, "keep-shop") == (200, b"original\n")
    assert page(service, "keep-shop", "/health/")[0] == 200
    # Nothing of the replaced data is left beside the store's.
    assert not Path(f"{data_dir(service, 'keep-shop')}.before-restore").exists()


def test_a_corrupted_backup_is_refused_before_the_store_is_touched(service):
    provision(service, "safe-shop")
    media = data_dir(service, "safe-shop") / "media" / "page.txt"
    media.write_text("before\n")
    assert service.cli("backup", "safe-shop", "--wait").returncode == 0
    [backup] = backups_of("safe-shop")
    media.write_text("current\n")
    raw = bytearray(Path(backup.path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    Path(backup.path).write_bytes(bytes(raw))
    started = inspect("ebuilder_safe-shop")["State"]["StartedAt"]

    refused = service.cli("restore", "safe-shop", str(backup.id), "--wait")
    assert refused.returncode == 1
    assert "backup refused, nothing was changed" in refused.stderr
    assert "checksum" in refused.stderr
    assert inspect("ebuilder_safe-shop")["State"]["StartedAt"] == started
    assert page(service, "safe-shop") == (200, b"current\n")


def test_clone_makes_a_new_store_with_the_data_and_its_own_key(service):
    provision(service, "orig-shop")
    source = data_dir(service, "orig-shop")
    (source / "media" / "page.txt").write_text("cloned content\n")
    cloned = service.cli("clone", "orig-shop", "copy-shop", "--wait")
    assert cloned.returncode == 0, cloned.stdout + cloned.stderr
    with db_session:
        copy = Instance.get(subdomain="copy-shop", live=True)
        assert copy.status == "running"
        original = Instance.get(subdomain="orig-shop", live=True)
        assert copy.subscription == original.subscription and copy.port != original.port
    assert page(service, "copy-shop") == (200, b"cloned content\n")
    target = data_dir(service, "copy-shop")
    assert (target / "db" / "admin").read_text() == (source / "db" / "admin").read_text()
    assert (target / "secret_key").read_text() != (source / "secret_key").read_text()
    assert [b.reason for b in backups_of("orig-shop")] == ["clone"]


def test_an_image_with_a_dump_hook_is_dumped_not_paused(service, tmp_path):
    """The image declares how to make a consistent dump: it is run in the container,
    which is never paused, and the archive holds the dump."""
    from tests.test_backups import backup_module

    (tmp_path / "Dockerfile").write_text(
        "FROM ebuilder-standin:latest\n"
        'LABEL ebuilder.backup.dump="cp /app/db/admin /app/db/dump.sql"\n')
    tag = f"ebuilder-standin-dump:{service.config.installation_id}"
    docker("build", "-q", "-t", tag, str(tmp_path))
    data = tmp_path / "store"
    for sub in ("db", "media", "logs"):
        (data / sub).mkdir(parents=True)
    name = f"dump-{service.config.installation_id}"
    try:
        docker("run", "-d", "--name", name, "--label",
               f"ebuilder.installation={service.config.installation_id}",
               "-e", "SECRET_KEY=k", "-e", "ALLOWED_HOSTS=x", "-e", "ADMIN_EMAIL=a@b.c",
               "-e", "ADMIN_PASSWORD=pw", "-v", f"{data}/db:/app/db", tag)
        poll(lambda: (data / "db" / "admin").exists(), timeout=30, what="first boot")
        params = {"docker_host": "unix:///var/run/docker.sock", "container": name,
                  "data_dir": str(data), "pause_paths": ["db"], "max_pause_seconds": 10,
                  "dump_label": "ebuilder.backup.dump", "timeout": 30}
        mode, paused, staged = backup_module.snapshot(params, str(tmp_path / "staging"))
        assert (mode, paused, staged) == ("dump", 0.0, set())
        assert (data / "db" / "dump.sql").read_text() == (data / "db" / "admin").read_text()
        assert inspect(name)["State"]["Paused"] is False
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", tag], capture_output=True)


def test_the_store_page_backs_up_and_restores_with_its_buttons(service, browser):
    """The store's care on one page (backups, its own domains, its uptime), saved as
    test-artifacts/admin-store-care.png."""
    from playwright.sync_api import Error as PlaywrightError

    from tests.integration.conftest import ADMIN_PASSWORD
    from tests.integration.test_admin_live import shot

    provision(service, "page-shop")
    media = data_dir(service, "page-shop") / "media" / "page.txt"
    media.write_text("first\n")
    with db_session:
        instance = Instance.get(subdomain="page-shop", live=True)
        store = instance.id
        # A domain waiting for its DNS record, and 40 days of health history with an
        # outage: what the page shows beside the backups.
        CustomDomain(instance=instance, name="shop.page-customer.test",
                     last_error="no A record yet")
        now = utcnow().replace(minute=30, second=0, microsecond=0)
        for hours in range(40 * 24, 0, -3):
            at = now - timedelta(hours=hours)
            HealthCheck(instance=instance, at=at, ok=not 200 <= hours < 206,
                        detail="healthy" if not 200 <= hours < 206 else "HTTP 502")
    context = browser.new_context(http_credentials={"username": "admin",
                                                    "password": ADMIN_PASSWORD},
                                  viewport={"width": 420, "height": 900})
    tab = context.new_page()
    tab.goto(f"{service.url}/admin/instances/{store}/")
    tab.locator("#backup-button").click()
    assert "backup queued" in tab.locator(".flash").inner_text()
    # The page reloads itself while the store has work queued.
    tab.wait_for_selector("#backups td.outcome-ok", timeout=120_000)
    media.write_text("second\n")
    tab.locator(".restore-button").first.click()
    assert "restore of backup" in tab.locator(".flash").inner_text()
    poll(lambda: page(service, "page-shop") == (200, b"first\n"), timeout=120,
         what="the restored page through nginx")
    # The page reloads itself every 2 s while the restore is recorded as queued: open it
    # again (a navigation of ours that meets its own reload is aborted) until it stops.
    def settled():
        try:
            tab.goto(f"{service.url}/admin/instances/{store}/")
            return tab.locator('meta[http-equiv="refresh"]').count() == 0
        except PlaywrightError:
            return False
    poll(settled, timeout=60, what="the store page without work queued")
    # The name, and the DNS record its customer is to create.
    assert "shop.page-customer.test. CNAME page-shop.stores.test." in \
        tab.locator("#domain-list").inner_text()
    assert tab.locator("#uptime-heading").is_visible()
    assert tab.locator(".uptime svg").count() >= 1
    shot(tab, "admin-store-care")
    context.close()


def test_a_restore_whose_store_does_not_start_puts_its_own_data_back(service):
    provision(service, "undo-shop")
    data = data_dir(service, "undo-shop")
    (data / "media" / "page.txt").write_text("old\n")
    # A backup of a moment the store was broken (the stand-in fails /health/ then).
    (data / "db" / "unhealthy").write_text("on purpose")
    assert service.cli("backup", "undo-shop", "--wait").returncode == 0
    (data / "db" / "unhealthy").unlink()
    (data / "media" / "page.txt").write_text("current\n")

    failed = service.cli("restore", "undo-shop", "--wait")
    assert failed.returncode == 1
    assert "restore failed, the store's previous data is back" in failed.stderr
    assert page(service, "undo-shop") == (200, b"current\n")
    assert page(service, "undo-shop", "/health/")[0] == 200
    assert not (data / "db" / "unhealthy").exists()
