"""Health sweeps keep what a person needs and bound the rest: one history row per
healthy store per hour, failures always; a sweep every store passed logs no task
and leaves no artifacts, one with a failure keeps both."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pony.orm import db_session

from provisioner import maintenance
from provisioner.ansible import operations
from provisioner.ansible.runner import OUTCOMES_FACT, HostOutcome, RunResult
from provisioner.models import HealthCheck, Instance, LogEntry, utcnow
from provisioner.testing import stripe_events
from provisioner.worker import Worker
from tests.conftest import apply_events

JUDGE = "Judge every store of the play at once."
UNHEALTHY = "unhealthy: container running, HTTP 404"


def running_store(config, name: str) -> int:
    apply_events(config, stripe_events.signup(subdomain=name, site_name=name.title(),
                                              email=f"{name}@example.com"))
    Worker(config).run_once()
    with db_session:
        instance = Instance.get(subdomain=name)
        assert instance.status == "running"
        return instance.id


class SweepRunner:
    """A health run as ansible-runner leaves it: a run dir with artifacts, task events
    streamed to the sink; the stores in `sick` fail their check."""

    def __init__(self, sick: set[str] = frozenset()):
        self.sick = sick

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 **kwargs):
        if playbook != "health.yml":  # the restart of a failed store: it works
            return RunResult(ident=ident, playbook=playbook, status="successful", rc=0,
                             artifact_dir=Path("/nonexistent"),
                             hosts={s["name"]: HostOutcome(ok=True) for s in stores})
        artifacts = config.ansible_runs_dir / ident / "artifacts" / ident
        (artifacts / "job_events").mkdir(parents=True)
        (artifacts / "stdout").write_text("PLAY RECAP\n")
        # health.yml judges every store in one task: one fact of verdicts.
        on_event({"event": "runner_on_ok",
                  "event_data": {"host": stores[0]["name"], "task": JUDGE,
                                 "res": {"ansible_facts": {OUTCOMES_FACT: {
                                     s["name"]: UNHEALTHY if s["name"] in self.sick else ""
                                     for s in stores}}}}})
        if self.sick:  # its run_once assert, on the play's first store
            on_event({"event": "runner_on_failed",
                      "event_data": {"host": stores[0]["name"], "task": "Fail when unhealthy.",
                                     "res": {"msg": f"{len(self.sick)} stores unhealthy"}}})
        return RunResult(ident=ident, playbook=playbook,
                         status="failed" if self.sick else "successful", rc=2 if self.sick else 0,
                         artifact_dir=artifacts,
                         hosts={s["name"]: HostOutcome(
                             ok=s["name"] not in self.sick, judged=True,
                             error=UNHEALTHY if s["name"] in self.sick else None) for s in stores})


def checks_of(store: int) -> list[tuple[bool, str | None]]:
    with db_session:
        return [(h.ok, h.action) for h in
                Instance[store].health_checks.select().order_by(HealthCheck.id)]


def test_a_healthy_store_keeps_one_row_per_hour_and_every_failure(config, recorded_runs):
    store = running_store(config, "steady-shop")
    operations.BACKEND = SweepRunner()
    try:
        for _ in range(3):
            maintenance.health_sweep(config)
        assert checks_of(store) == [(True, None)]
        with db_session:
            [row] = Instance[store].health_checks.select()[:]
            assert utcnow() - row.at < timedelta(minutes=1), "the row dates the latest check"
            row.at -= timedelta(hours=1)  # the same row, as seen an hour later
        maintenance.health_sweep(config)
        assert checks_of(store) == [(True, None), (True, None)]

        operations.BACKEND = SweepRunner(sick={"steady-shop"})
        maintenance.health_sweep(config)
        operations.BACKEND = SweepRunner()
        maintenance.health_sweep(config)
        maintenance.health_sweep(config)
    finally:
        operations.BACKEND = recorded_runs
    assert checks_of(store) == [(True, None), (True, None), (False, "restart"), (True, None)]


def test_a_sweep_all_passed_leaves_no_artifacts_nor_task_logs(config, recorded_runs):
    running_store(config, "quiet-shop")
    runs_before = set(config.ansible_runs_dir.glob("health-*"))
    operations.BACKEND = SweepRunner()
    try:
        with db_session:
            logs_before = LogEntry.select().count()
        maintenance.health_sweep(config)
    finally:
        operations.BACKEND = recorded_runs
    with db_session:
        assert LogEntry.select().count() == logs_before
    assert set(config.ansible_runs_dir.glob("health-*")) == runs_before, "artifacts were kept"


def test_a_sweep_with_a_failure_keeps_its_artifacts_and_the_failure_in_the_log(
        config, recorded_runs):
    calm = running_store(config, "calm-shop")  # first in the play: the run's failure lands on it
    store = running_store(config, "sick-shop")
    runs_before = set(config.ansible_runs_dir.glob("health-*"))
    operations.BACKEND = SweepRunner(sick={"sick-shop"})
    try:
        maintenance.health_sweep(config)
    finally:
        operations.BACKEND = recorded_runs
    with db_session:
        tasks = [(e.instance.subdomain, e.outcome, e.message) for e in LogEntry.select(
            lambda e: e.task == JUDGE)]
        assert tasks == [("sick-shop", "failed", f"{JUDGE}: failed: {UNHEALTHY}")]
        sweep_logs = LogEntry.select(lambda e: e.ansible_run.playbook == "health.yml")[:]
        assert not [e for e in sweep_logs if e.instance and e.instance.id == calm], \
            "the run's own failure was pinned on the first store"
        assert [e.message for e in sweep_logs if e.instance is None] == \
            ["Fail when unhealthy.: failed: 1 stores unhealthy"]
    assert checks_of(store) == [(False, "restart")]
    kept = set(config.ansible_runs_dir.glob("health-*")) - runs_before
    assert len(kept) == 1 and (Path(kept.pop()) / "artifacts").is_dir()


def test_the_public_status_dates_the_last_sweep_by_its_latest_check(config):
    """An older row whose time moved to the latest check (a store healthy all hour) is
    newer than a later row of another store that stopped being checked."""
    from provisioner import admin
    from provisioner.models import HealthCheck

    store = running_store(config, "dated-shop")
    other = running_store(config, "other-dated-shop")
    with db_session:
        moved = HealthCheck(instance=store, ok=True, detail="healthy")
        HealthCheck(instance=other, ok=False, detail="unhealthy",
                    at=utcnow() - timedelta(hours=2))
        moved.at = utcnow()
        latest = moved.at
    with db_session:
        assert admin.public_status()["last_health_sweep"] == \
            latest.isoformat(timespec="seconds") + "Z"


class BrokenSweep:
    """A health run whose judge never ran (a bad playbook, a killed run): every store
    failed with the run's own error and no verdict. Anything else it runs counts."""

    def __init__(self):
        self.other_runs = []

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 **kwargs):
        if playbook != "health.yml":
            self.other_runs.append(playbook)
        artifacts = config.ansible_runs_dir / ident / "artifacts" / ident
        (artifacts / "job_events").mkdir(parents=True)
        (artifacts / "stdout").write_text("ERROR! template error while templating string\n")
        return RunResult(ident=ident, playbook=playbook, status="failed", rc=4,
                         artifact_dir=artifacts,
                         hosts={s["name"]: HostOutcome(ok=False, error="template error")
                                for s in stores})


def test_a_sweep_that_broke_before_its_verdicts_restarts_nothing(config, recorded_runs):
    store = running_store(config, "unjudged-shop")
    broken = BrokenSweep()
    operations.BACKEND = broken
    try:
        report = maintenance.health_sweep(config)
    finally:
        operations.BACKEND = recorded_runs
    assert report.failed
    assert report.lines == ["unjudged-shop: not judged, left alone: template error"]
    assert broken.other_runs == [], "a broken sweep restarted stores"
    assert checks_of(store) == []
    with db_session:
        assert Instance[store].health_failures == 0
