"""A paying customer's first provisioning never waits for a fleet batch: while a
health sweep's playbook runs, a new store is provisioned beside it and goes live."""

from __future__ import annotations

import threading
from pathlib import Path

from pony.orm import db_session

from provisioner import jobs
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.models import Instance, Job, utcnow
from provisioner.states import JobKind
from provisioner.testing import stripe_events
from provisioner.worker import Worker
from tests.conftest import apply_events


class HeldSweep:
    """Every playbook succeeds at once, except health.yml: it runs until released."""

    def __init__(self):
        self.sweeping = threading.Event()
        self.release = threading.Event()
        self.playbooks: list[str] = []

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 **kwargs):
        self.playbooks.append(playbook)
        if playbook == "health.yml":
            self.sweeping.set()
            assert self.release.wait(60), "the test never released the sweep"
        return RunResult(ident=ident or "x", playbook=playbook, status="successful", rc=0,
                         artifact_dir=Path("/nonexistent"),
                         hosts={s["name"]: HostOutcome(ok=True) for s in stores})


def store_status(name: str) -> str | None:
    with db_session:
        instance = Instance.get(subdomain=name)
        return instance.status if instance else None


def test_a_signup_goes_live_while_a_health_sweep_runs(config, recorded_runs):
    with db_session:
        Instance(subdomain="old-shop", site_name="Old", admin_email="old@example.com",
                 port=19111, status="running", desired_state="running",
                 provisioned_at=utcnow())
        jobs.enqueue(JobKind.HEALTH)
    runner = operations.BACKEND = HeldSweep()
    stop = threading.Event()
    worker = Worker(config, stop=stop)
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        assert runner.sweeping.wait(30), "the health sweep never started"
        apply_events(config, stripe_events.signup(subdomain="new-shop", site_name="New",
                                                  email="new@example.com"))
        worker.wake.set()
        deadline = threading.Event()
        for _ in range(300):
            if store_status("new-shop") == "running":
                break
            deadline.wait(0.1)
        assert store_status("new-shop") == "running", runner.playbooks
        assert not runner.release.is_set()
        with db_session:
            sweep = Job.select(lambda j: j.kind == "health").first()
            assert sweep.state == "running", "the sweep was still going"
    finally:
        runner.release.set()
        stop.set()
        thread.join(60)
        operations.BACKEND = recorded_runs
    assert "provision.yml" in runner.playbooks


def test_only_the_signups_lane_builds_new_stores_and_it_builds_nothing_else(config):
    from provisioner.worker import LANES

    with db_session:
        new = Instance(subdomain="fresh-shop", site_name="Fresh", admin_email="f@example.com",
                       port=19112, status="provisioning", desired_state="running")
        old = Instance(subdomain="known-shop", site_name="Known", admin_email="k@example.com",
                       port=19113, status="running", desired_state="running",
                       provisioned_at=utcnow())
        jobs_by_name = {"new converge": jobs.enqueue(JobKind.CONVERGE, instance=new),
                        "old converge": jobs.enqueue(JobKind.CONVERGE, instance=old),
                        "new action": jobs.enqueue(JobKind.ACTION, instance=new,
                                                   detail="stop"),
                        "health": jobs.enqueue(JobKind.HEALTH)}
    ids = {job.id: name for name, job in jobs_by_name.items()}
    with db_session:
        signups = [ids[i] for i in jobs.claim_due(kinds=LANES["signups"], new_stores=True)]
    with db_session:
        # The new store has a running job now: its action waits for it.
        main = [ids[i] for i in jobs.claim_due(kinds=LANES["ansible"], new_stores=False)]
    assert signups == ["new converge"]
    assert main == ["old converge", "health"]
