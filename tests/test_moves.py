"""Moving a store to another Docker host: what is refused before anything runs, what
the move run is told, and what its result means for the store (the run itself is
tests/integration/test_multi_host.py, over SSH between two network namespaces)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from pony.orm import db_session, flush

from provisioner import admin, backups, maintenance, moves
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.models import AuditEntry, Backup, Instance, Job, LogEntry, utcnow
from provisioner.web import create_app
from provisioner.worker import Worker
from tests.test_admin_api import AUTH, PASSWORD
from tests.test_health_history import running_store
from tests.wsgi import call

HOSTS = """\
edge:
  hosts:
    localhost:
docker_hosts:
  vars:
    ansible_connection: local
  hosts:
    localhost:
      provisioner_max_stores: 10
    far:
      provisioner_private_address: 10.213.2.2
      provisioner_backup_root: /srv/far/backups
      provisioner_max_stores: {far_room}
    closing:
      provisioner_drain: true
    elsewhere:
      provisioner_edge: edge-2
      provisioner_max_stores: 1
"""


def with_hosts(config, tmp_path, far_room: int = 5):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(HOSTS.format(far_room=far_room))
    return dataclasses.replace(config, inventory_path=str(inventory))


class MoveRunner:
    """move.yml as its result tells it: the store serves from `lands_on` (None: the
    move failed before the switch), and the run failed with `error` (if any)."""

    def __init__(self, lands_on: str | None, error: str | None = None):
        self.lands_on, self.error = lands_on, error
        self.calls: list[tuple[str, list[dict], dict]] = []

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 extra_vars=None, **kwargs):
        stash = Path(extra_vars["move_stash"])
        self.calls.append((playbook, stores, {**extra_vars, "stash_existed": stash.is_dir(),
                                              "stash_mode": stash.stat().st_mode & 0o777}))
        name = stores[0]["name"]
        return RunResult(
            ident=ident or "x", playbook=playbook,
            status="failed" if self.error else "successful", rc=2 if self.error else 0,
            artifact_dir=Path("/nonexistent"),
            hosts={name: HostOutcome(ok=self.error is None, error=self.error)},
            store_results={name: {"docker_host": self.lands_on}} if self.lands_on else {})


@pytest.fixture
def runner_is(monkeypatch):
    def install(runner):
        monkeypatch.setattr(operations, "BACKEND", runner)
        return runner
    return install


def move_job(config, store_id: int, target: str) -> int:
    with db_session:
        job = moves.request_move(config, Instance[store_id], target)
        flush()
        return job.id


def test_a_move_is_refused_at_once_where_the_store_cannot_go(config, tmp_path):
    hosts = with_hosts(config, tmp_path, far_room=0)
    store_id = running_store(hosts, "stay-shop")
    with db_session:
        store = Instance[store_id]
        for target, why in (("localhost", "already on localhost"),
                            ("nowhere", "not a Docker host of"),
                            ("closing", "closing is draining"),
                            ("far", r"far is full \(0 of 0 stores\)"),
                            ("elsewhere", "served by edge-2, this store's by localhost")):
            with pytest.raises(moves.Refused, match=why):
                moves.request_move(hosts, store, target)
        store.status = "provisioning"
        with pytest.raises(moves.Refused, match="is provisioning: only a running"):
            moves.request_move(with_hosts(config, tmp_path), store, "far")
        assert Job.select(lambda j: j.kind == "move").count() == 0


def test_the_api_queues_a_move_and_says_why_one_is_refused(config, tmp_path):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "api-shop")
    app = create_app(dataclasses.replace(hosts, admin_password=PASSWORD))
    status, body = call(app, "POST", f"/api/instances/{store_id}/move/",
                        {"docker_host": "closing"}, headers=AUTH)
    assert status == 409 and "draining" in body["error"]
    status, body = call(app, "POST", f"/api/instances/{store_id}/move/", {}, headers=AUTH)
    assert status == 400 and "docker_host" in body["error"]
    status, body = call(app, "POST", f"/api/instances/{store_id}/move/", {"docker_host": "far"},
                        headers=AUTH)
    assert status == 202, body
    assert (body["from"], body["to"]) == ("localhost", "far")
    with db_session:
        job = Job[body["job_id"]]
        assert (job.kind, job.detail, job.instance.id) == ("move", "far", store_id)
        said = [a.detail for a in AuditEntry.select(lambda a: a.action == "move")]
        assert any("move from localhost to far queued" in line for line in said), said
        assert any("refused: closing is draining" in line for line in said), said
        assert admin.instance_detail(hosts, store_id)["host"]["move_targets"] == ["far"]


def test_a_move_tells_the_run_where_to_and_the_store_lives_there_once_it_serves(
        config, tmp_path, runner_is):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "go-shop")
    runner = runner_is(MoveRunner(lands_on="far"))
    # A killed move's stash (customer data in transit) is removed by the next move.
    leftover = hosts.ansible_runs_dir / "move-killed"
    leftover.mkdir(parents=True)
    (leftover / "go-shop.tar.gz").write_bytes(b"data")
    job_id = move_job(hosts, store_id, "far")
    Worker(hosts).run_once()
    [(playbook, [record], extra)] = runner.calls
    assert playbook == "move.yml"
    assert (record["docker_host"], record["move_to"], record["state"]) == \
        ("localhost", "far", "running")
    # Archived on the old host, under its backup root.
    assert record["move_archive"].startswith(
        f"{hosts.backup_root}/go-shop-{store_id}/go-shop-move-")
    # The controller's stash is private while the run uses it, and gone after.
    assert extra["stash_existed"] and extra["stash_mode"] == 0o700
    assert not Path(extra["move_stash"]).exists() and not leftover.exists()
    with db_session:
        store, job = Instance[store_id], Job[job_id]
        assert (store.docker_host, store.status, job.state) == ("far", "running", "done")
        logs = [e.message for e in store.logs]
    assert any(line.startswith("moved from localhost to far in ") for line in logs)


def test_a_failed_move_leaves_the_store_on_its_old_host_and_says_why(
        config, tmp_path, runner_is):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "back-shop")
    runner_is(MoveRunner(lands_on=None, error="port 19000 is already allocated"))
    job_id = move_job(hosts, store_id, "far")
    Worker(hosts).run_once()
    with db_session:
        store, job = Instance[store_id], Job[job_id]
        # Not retried on its own: each try stops the store.
        assert (store.docker_host, job.state) == ("localhost", "failed")
        assert "stays on localhost: port 19000 is already allocated" in job.last_error
        assert any("move to far failed, the store stays on localhost" in e.message
                   for e in store.logs)
        # In case the run died before putting it back: brought to its state where it is.
        assert Job.select(lambda j: j.kind == "converge" and j.instance == store
                          and j.id > job_id).count() == 1


def test_a_move_whose_cleanup_failed_still_names_the_new_host(config, tmp_path, runner_is):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "half-shop")
    runner_is(MoveRunner(lands_on="far", error="could not remove the old container"))
    move_job(hosts, store_id, "far")
    Worker(hosts).run_once()
    with db_session:
        store = Instance[store_id]
        assert store.docker_host == "far"
        warnings = [e.message for e in store.logs if e.level == "warning"]
    assert any("cleaning up on localhost failed" in line and "sync --check" in line
               for line in warnings)


def test_backups_made_before_a_move_stay_with_the_old_host(config, tmp_path, runner_is):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "old-backups-shop")
    with db_session:
        store = Instance[store_id]
        before = Backup(instance=store, path="/srv/ebuilder/backups/x/old.tar.gz",
                        docker_host="localhost", reason="scheduled", status="ok",
                        sha256="0" * 64, created_at=utcnow() - timedelta(days=400))
        flush()
        before_id = before.id
    runner_is(MoveRunner(lands_on="far"))
    move_job(hosts, store_id, "far")
    Worker(hosts).run_once()
    with db_session:
        store = Instance[store_id]
        # Not restorable from the new host, and not aged out by its retention (the run
        # that deletes old archives runs on the new host).
        with pytest.raises(backups.Refused, match=f"backup {before_id} is on localhost"):
            backups.find_backup(store, before_id)
        with pytest.raises(backups.Refused, match="has no good backup"):
            backups.find_backup(store, None)
        assert backups.expired(hosts, store, utcnow()) == []


def test_an_interrupted_move_is_never_tried_again_on_its_own(config, tmp_path, runner_is):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "twice-shop")
    runner = runner_is(MoveRunner(lands_on="far"))
    job_id = move_job(hosts, store_id, "far")
    with db_session:
        # What a try that died mid-run leaves: its start in the job's log.
        LogEntry(instance=Instance[store_id], job=Job[job_id],
                 message="move from localhost to far started")
    Worker(hosts).run_once()
    assert runner.calls == []
    with db_session:
        job = Job[job_id]
        assert job.state == "failed" and "an earlier try" in job.last_error
        assert Instance[store_id].docker_host == "localhost"


def test_the_maintenance_jobs_leave_a_store_being_moved_alone(config, tmp_path):
    hosts = with_hosts(config, tmp_path)
    store_id = running_store(hosts, "busy-shop")
    other_id = running_store(hosts, "calm-shop")
    job_id = move_job(hosts, store_id, "far")
    with db_session:
        Job[job_id].state = "running"
    with db_session:
        assert moves.moving() == {store_id}
        assert [i.id for i in maintenance._running_stores()] == [other_id]
