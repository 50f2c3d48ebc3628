"""Backups: what is archived and refused (the role's modules, on real files), which
backups retention drops, and what a run's result means for each store."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from pony.orm import db_session

from provisioner import admin, backups
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.models import AlertIncident, AuditEntry, Backup, Instance, Job, utcnow
from provisioner.web import create_app
from provisioner.worker import Worker
from tests.role_modules import library, module_utils
from tests.test_admin_api import AUTH, PASSWORD
from tests.test_health_history import running_store
from tests.wsgi import call

archive = module_utils("ebuilder_archive")
backup_module = library("ebuilder_instance_backup")
restore_module = library("ebuilder_instance_restore")


def a_store_dir(root: Path) -> Path:
    data = root / "42"
    for sub in ("db", "media", "logs"):
        (data / sub).mkdir(parents=True)
    (data / "db" / "admin").write_text("admin@example.com\nhash\n")
    (data / "media" / "page.txt").write_text("original\n")
    (data / "secret_key").write_text("s3cret")
    return data


def make_archive(data: Path, path: Path) -> str:
    backup_module.write_archive(str(data), str(path), "", set())
    digest = archive.sha256_of(str(path))
    archive.write_checksum(str(path), digest)
    return digest


def test_an_archive_holds_the_data_dir_and_verifies_end_to_end(tmp_path):
    data = a_store_dir(tmp_path)
    path = tmp_path / "b" / "one.tar.gz"
    path.parent.mkdir()
    digest = make_archive(data, path)
    checked = archive.verify(str(path), digest)
    assert checked["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(path) as tar:
        assert {"data", "data/db/admin", "data/media/page.txt", "data/secret_key"} <= \
            set(tar.getnames())
    # sha256sum -c agrees with the checksum file.
    assert subprocess.run(["sha256sum", "-c", f"{path.name}.sha256"], cwd=path.parent,
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "checksum"])
def test_a_damaged_archive_is_refused(tmp_path, damage):
    path = tmp_path / "one.tar.gz"
    digest = make_archive(a_store_dir(tmp_path), path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) - 40]))
    else:
        Path(f"{path}.sha256").write_text(f"{'0' * 64}  one.tar.gz\n")
        digest = ""
    with pytest.raises(ValueError, match="checksum|unreadable"):
        archive.verify(str(path), digest)


def hostile_archive(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        db = tarfile.TarInfo("data/db")
        db.type = tarfile.DIRTYPE
        tar.addfile(db)
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    path.write_bytes(buffer.getvalue())
    archive.write_checksum(str(path), archive.sha256_of(str(path)))


@pytest.mark.parametrize("name,kind,link", [
    ("data/../../etc/evil", tarfile.REGTYPE, ""),
    ("/etc/evil", tarfile.REGTYPE, ""),
    ("other/file", tarfile.REGTYPE, ""),
    ("data/media/escape", tarfile.SYMTYPE, "../../../../etc/passwd"),
    ("data/media/abs", tarfile.SYMTYPE, "/etc/passwd"),
    ("data/media/dev", tarfile.CHRTYPE, ""),
])
def test_members_that_would_land_outside_the_store_are_refused(tmp_path, name, kind, link):
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    path = tmp_path / "evil.tar.gz"
    hostile_archive(path, member)
    with pytest.raises(ValueError, match="outside|links outside|special"):
        archive.verify(str(path))


def test_an_archive_without_a_database_is_not_a_stores_backup(tmp_path):
    data = tmp_path / "7"
    (data / "media").mkdir(parents=True)
    path = tmp_path / "x.tar.gz"
    make_archive(data, path)
    with pytest.raises(ValueError, match="no data/db"):
        archive.verify(str(path))


def test_restore_swaps_the_data_keeping_the_old_until_committed_or_rolled_back(tmp_path):
    data = a_store_dir(tmp_path)
    os.chmod(data / "db", 0o700)
    os.chown(data / "db" / "admin", 1234, 1234)
    path = tmp_path / "one.tar.gz"
    make_archive(data, path)
    (data / "media" / "page.txt").write_text("changed\n")
    incoming = Path(f"{data}.restoring")
    restore_module.unpack(str(path), str(incoming), ["secret_key"])
    assert (incoming / "media" / "page.txt").read_text() == "original\n"
    assert not (incoming / "secret_key").exists()
    # Owners and modes as they were (an app running as its own user can still write).
    assert (incoming / "db").stat().st_mode & 0o777 == 0o700
    assert (incoming / "db" / "admin").stat().st_uid == 1234
    # A restore that failed puts the store's own data back ...
    restore_module.swap(str(data))
    assert (data / "media" / "page.txt").read_text() == "original\n"
    assert restore_module.roll_back(str(data))
    assert (data / "media" / "page.txt").read_text() == "changed\n"
    # ... one that held drops it.
    restore_module.unpack(str(path), str(incoming), [])
    restore_module.swap(str(data))
    assert restore_module.commit(str(data))
    assert not Path(f"{data}.before-restore").exists() and not incoming.exists()
    assert (data / "media" / "page.txt").read_text() == "original\n"


def test_data_an_unfinished_restore_left_aside_is_never_deleted(tmp_path):
    data = a_store_dir(tmp_path)
    path = tmp_path / "one.tar.gz"
    make_archive(data, path)
    aside = Path(f"{data}.before-restore")
    aside.mkdir()
    (aside / "only-copy.txt").write_text("orders of last week")
    restore_module.unpack(str(path), f"{data}.restoring", [])
    result = restore_module.swap(str(data))
    assert (Path(result["earlier_kept"]) / "only-copy.txt").read_text() == "orders of last week"
    assert restore_module.roll_back(str(data))
    assert (data / "media" / "page.txt").read_text() == "original\n"


def test_retention_keeps_the_newest_and_drops_by_count_and_age(config):
    with db_session:
        instance = Instance(subdomain="keep", site_name="K", admin_email="k@example.com",
                            port=19150, status="running")
        now = utcnow()
        rows = [Backup(instance=instance, path=f"/b/{n}.tar.gz", docker_host="localhost",
                       status="ok", reason="scheduled", created_at=now - timedelta(days=n))
                for n in range(6)]
        Backup(instance=instance, path="/b/failed.tar.gz", docker_host="localhost",
               status="failed", reason="scheduled", created_at=now)
        Backup(instance=instance, path="/b/manual.tar.gz", docker_host="localhost",
               status="ok", reason="manual", created_at=now - timedelta(days=5))
        kept3 = dataclasses.replace(config, backup_keep=3, backup_keep_days=30)
        # A new scheduled one will be made: the two newest stay beside it; a manual
        # backup never counts against the schedule's history.
        assert {b.path for b in backups.expired(kept3, instance, now)} == \
            {r.path for r in rows[2:]}
        assert {b.path for b in backups.expired(kept3, instance, now, "manual")} == \
            {r.path for r in rows[3:]}
        by_age = dataclasses.replace(config, backup_keep=10, backup_keep_days=3)
        assert {b.path for b in backups.expired(by_age, instance, now)} == \
            {r.path for r in rows[4:]} | {"/b/manual.tar.gz"}


class BackupRun:
    """What backup.yml tells the service: each store's archive facts (or a failure)."""

    def __init__(self, failing=(), copy_error=""):
        self.failing, self.copy_error, self.runs = set(failing), copy_error, []

    def __call__(self, config, playbook, stores, secrets=None, **kwargs):
        self.runs.append((playbook, stores))
        hosts, results = {}, {}
        for store in stores:
            if store["name"] in self.failing:
                hosts[store["name"]] = HostOutcome(ok=False, error="disk full")
                continue
            hosts[store["name"]] = HostOutcome(ok=True, changed=1)
            results[store["name"]] = {"archive": store["backup"], "sha256": "ab" * 32,
                                      "size_bytes": 1234, "mode": "pause",
                                      "paused_seconds": 0.2, "copy_error": self.copy_error,
                                      "copy_path": "" if self.copy_error else "/copy/x"}
        return RunResult(ident="b", playbook=playbook, status="successful", rc=0,
                         artifact_dir=Path("/nonexistent"), hosts=hosts, store_results=results)


def test_the_schedule_backs_up_every_running_store_in_one_run(config, monkeypatch):
    first, second = running_store(config, "alpha"), running_store(config, "beta")
    run = BackupRun(failing={"beta"})
    monkeypatch.setattr(operations, "BACKEND", run)
    message = backups.backup(config, None, reason="scheduled")
    assert message.startswith("backup (scheduled): 1 made, 1 failed")
    [(playbook, stores)] = run.runs
    assert playbook == "backup.yml" and [s["name"] for s in stores] == ["alpha", "beta"]
    assert stores[0]["backup"].startswith(f"{config.backup_root}/alpha-{first}/alpha-")
    with db_session:
        good, bad = Instance[first].backups.select()[:][0], Instance[second].backups.select()[:][0]
        assert (good.status, good.sha256, good.copy_path) == ("ok", "ab" * 32, "/copy/x")
        assert (bad.status, bad.error) == ("failed", "disk full")
        [incident] = AlertIncident.select()[:]
        assert incident.key == f"backup_failed:{second}" and incident.resolved_at is None
    # The next good backup of that store clears its incident.
    monkeypatch.setattr(operations, "BACKEND", BackupRun())
    backups.backup(config, [second], reason="manual")
    with db_session:
        assert AlertIncident.select().first().resolved_at is not None


def test_a_big_fleet_is_backed_up_in_runs_of_bounded_size(config, monkeypatch):
    for n in range(5):
        running_store(config, f"fleet-{n}")
    run = BackupRun()
    monkeypatch.setattr(operations, "BACKEND", run)
    monkeypatch.setattr(backups, "RUN_SIZE", 2)
    assert backups.backup(config, None, "scheduled").startswith("backup (scheduled): 5 made")
    assert [len(stores) for _, stores in run.runs] == [2, 2, 1]


def test_a_failed_second_copy_keeps_the_backup_and_alerts(config, monkeypatch):
    store = running_store(config, "gamma")
    monkeypatch.setattr(operations, "BACKEND", BackupRun(copy_error="rsync: host unreachable"))
    backups.backup(config, [store], reason="manual")
    with db_session:
        [row] = Instance[store].backups.select()[:]
        assert row.status == "ok" and row.copy_path is None
        assert row.error == "rsync: host unreachable"
        assert AlertIncident.get(key=f"backup_failed:{store}").resolved_at is None


def test_a_failed_manual_backup_is_retried_and_visible(config, monkeypatch):
    store = running_store(config, "delta")
    monkeypatch.setattr(operations, "BACKEND", BackupRun(failing={"delta"}))
    with db_session:
        job_id = admin.backup_store(store, admin.Actor("ops")).get("job_id")
    Worker(config).run_once()  # retries at once here (JOB_RETRY_BASE_SECONDS=0)
    with db_session:
        job = Job[job_id]
        assert (job.state, job.attempts) == ("failed", config.job_max_attempts)
        assert "disk full" in job.last_error
        tries = Instance[store].backups.select()[:]
        assert len(tries) == config.job_max_attempts
        assert {b.status for b in tries} == {"failed"}
        assert AuditEntry.get(action="backup").actor == "ops"


def test_restore_and_clone_are_refused_when_they_cannot_work(config):
    store = running_store(config, "epsilon")
    other = running_store(config, "zeta")
    with db_session:
        with pytest.raises(admin.Conflict, match="no good backup"):
            admin.restore_store(store, None, admin.Actor("ops"))
        failed = Backup(instance=Instance[store], path="/b/f.tar.gz", docker_host="localhost",
                        status="failed")
        theirs = Backup(instance=Instance[other], path="/b/z.tar.gz", docker_host="localhost",
                        status="ok", sha256="cd" * 32)
        with pytest.raises(admin.Conflict, match="is failed"):
            admin.restore_store(store, failed.id, admin.Actor("ops"))
        with pytest.raises(admin.Conflict, match="has no backup"):
            admin.restore_store(store, theirs.id, admin.Actor("ops"))
        with pytest.raises(admin.Conflict, match="already taken"):
            admin.clone_store(config, store, "zeta", None, admin.Actor("ops"))
        with pytest.raises(admin.Conflict, match="only a-z"):
            admin.clone_store(config, store, "Bad_Name!", None, admin.Actor("ops"))
        Instance[other].status = "suspended"
        with pytest.raises(admin.Conflict, match="only a running store is restored"):
            admin.restore_store(other, theirs.id, admin.Actor("ops"))
        refused = AuditEntry.select(lambda a: a.detail.startswith("refused"))[:]
        assert len(refused) == 6


def test_a_clone_is_a_new_store_of_the_same_customer_without_a_welcome(config):
    store = running_store(config, "theta")
    with db_session:
        result = admin.clone_store(config, store, "theta-copy", None, admin.Actor("ops"))
        clone, source = Instance[result["clone_id"]], Instance[store]
        assert (clone.subdomain, clone.status, clone.desired_state) == \
            ("theta-copy", "pending", "running")
        assert clone.customer == source.customer and clone.port != source.port
        assert clone.welcome_sent_at is not None and clone.admin_password is None
        assert Job[result["job_id"]].detail == f"{store}:new"


@pytest.fixture
def admin_config(config):
    return dataclasses.replace(config, admin_password=PASSWORD)


@pytest.fixture
def app(admin_config):
    return create_app(admin_config)


def test_the_api_lists_queues_and_refuses_with_reasons(app, admin_config):
    store = running_store(admin_config, "iota")
    status, body = call(app, "POST", f"/api/instances/{store}/backups/", {}, headers=AUTH)
    assert status == 202 and body["status_url"] == f"/api/jobs/{body['job_id']}/"
    with db_session:
        assert Job[body["job_id"]].kind == "backup"
        Backup(instance=Instance[store], path="/b/i.tar.gz", docker_host="localhost",
               status="ok", sha256="ef" * 32, size_bytes=10)
    status, listed = call(app, "GET", f"/api/instances/{store}/backups/", headers=AUTH)
    assert status == 200 and [b["path"] for b in listed["items"]] == ["/b/i.tar.gz"]
    status, body = call(app, "POST", f"/api/instances/{store}/restore/", {}, headers=AUTH)
    assert status == 202 and body["backup"]["path"] == "/b/i.tar.gz"
    assert call(app, "POST", f"/api/instances/{store}/restore/", {"backup": 999},
                headers=AUTH) == (409, {"error": "store iota has no backup 999"})
    assert call(app, "POST", f"/api/instances/{store}/clone/", {}, headers=AUTH)[0] == 400
    assert call(app, "POST", f"/api/instances/{store}/clone/", {"subdomain": ["x"]},
                headers=AUTH)[0] == 400
    status, body = call(app, "POST", f"/api/instances/{store}/clone/",
                        {"subdomain": "iota-copy"}, headers=AUTH)
    assert status == 202 and body["subdomain"] == "iota-copy"
    assert call(app, "POST", "/api/instances/999/backups/", {}, headers=AUTH)[0] == 404


def test_the_store_page_lists_backups_and_its_forms_need_the_csrf_token(app, admin_config):
    store = running_store(admin_config, "kappa")
    with db_session:
        Backup(instance=Instance[store], path="/b/<script>.tar.gz", docker_host="localhost",
               status="ok", sha256="ef" * 32, size_bytes=2 * 1048576)
    status, html, _ = call(app, "GET", f"/admin/instances/{store}/", headers=AUTH, raw=True)
    assert status == 200 and b"2.0 MiB" in html and b"/b/&lt;script&gt;.tar.gz" in html
    assert b'action="/admin/instances/%d/restore/"' % store in html
    status, _, _ = call(app, "POST", f"/admin/instances/{store}/backup/", b"", raw=True,
                        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403
    with db_session:
        assert not Job.select(lambda j: j.kind == "backup").exists()
