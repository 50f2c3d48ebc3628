"""A sysadmin's playbook run by hand: kept as a run of its stores, and what it did is
what the service wants from then on (the integration test runs the real playbooks and
callback from another directory)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from pony.orm import db_session, flush

from provisioner import maintenance, sysadmin_runs
from provisioner.models import AnsibleRun, AuditEntry, Customer, Instance, Job, Subscription
from provisioner.states import StoreState


def store(name: str = "janes-shop", billing: str = "active") -> int:
    with db_session:
        customer = Customer(stripe_id=f"cus_{name}", email=f"{name}@example.com")
        subscription = Subscription(stripe_id=f"sub_{name}", customer=customer, status=billing,
                                    payment_confirmed=True)
        desired = "running" if billing == "active" else "suspended"
        instance = Instance(subdomain=name, site_name=name, admin_email=f"{name}@example.com",
                            port=19120 + len(name), customer=customer, subscription=subscription,
                            status=desired, desired_state=desired,
                            provisioned_at=datetime(2026, 1, 1))
        flush()
        return instance.id


def run_record(playbook: str = "/srv/provisioner/playbooks/stop.yml", **hosts) -> dict:
    now = datetime.now(UTC)
    return {"playbook": playbook, "user": "alice", "host": "bastion",
            "started_at": (now - timedelta(seconds=9)).isoformat(),
            "finished_at": now.isoformat(),
            "hosts": hosts or {"janes-shop": {"ok": True}},
            "tasks": [{"host": "janes-shop", "task": "Stop the container.",
                       "outcome": "changed", "duration": 1.5}]}


def test_a_manual_stop_is_kept_as_a_run_and_held_against_the_health_sweep(config):
    instance_id = store()
    lines = sysadmin_runs.record(config, sysadmin_runs.parse(run_record()))
    assert lines[0].startswith("recorded as run ") and "by alice on bastion" in lines[0]
    assert "janes-shop: stopped, held against billing" in lines[1]
    with db_session:
        instance = Instance[instance_id]
        assert (instance.status, instance.admin_hold) == (StoreState.STOPPED, True)
        assert "stop by a sysadmin (alice on bastion)" in instance.status_message
        run = AnsibleRun.select().first()
        assert (run.playbook, run.status, run.started_by) == \
            ("stop.yml", "successful", "alice on bastion")
        messages = [e.message for e in instance.logs]
        assert "stop.yml run by alice on bastion: ok" in messages
        task = next(e for e in run.logs if e.task)
        assert (task.instance.id, task.outcome, task.duration) == (instance_id, "changed", 1.5)
        assert AuditEntry.select(lambda a: a.actor == "sysadmin:alice on bastion").exists()
        # The health sweep looks at running stores it may restart: not this one.
        assert instance_id not in [i.id for i in maintenance._running_stores()]
        assert not Job.select().exists()


def test_a_manual_start_after_a_stop_releases_the_hold(config):
    instance_id = store()
    sysadmin_runs.record(config, sysadmin_runs.parse(run_record()))
    sysadmin_runs.record(config, sysadmin_runs.parse(
        run_record("/elsewhere/playbooks/start.yml")))
    with db_session:
        instance = Instance[instance_id]
        assert (instance.status, instance.admin_hold) == (StoreState.RUNNING, False)
        assert instance_id in [i.id for i in maintenance._running_stores()]


def test_a_manual_start_against_billing_is_not_taken_over(config):
    instance_id = store(billing="unpaid")
    lines = sysadmin_runs.record(config, sysadmin_runs.parse(
        run_record("playbooks/start.yml")))
    assert "start not kept: billing says suspended" in lines[1]
    with db_session:
        instance = Instance[instance_id]
        # Running against billing: the service puts it back as billing says.
        assert instance.status == StoreState.OUT_OF_STEP
        assert Job.select(lambda j: j.instance == instance and j.kind == "converge").exists()


def test_a_manual_destroy_frees_the_store_with_its_archive(config):
    instance_id = store()
    archive = "/srv/backups/janes-shop-final.tar.gz"
    sysadmin_runs.record(config, sysadmin_runs.parse(run_record(
        "playbooks/destroy.yml", **{"janes-shop": {"ok": True, "result": {"archive": archive}}})))
    with db_session:
        instance = Instance[instance_id]
        assert (instance.live, instance.status, instance.archive_path) == \
            (False, StoreState.DESTROYED, archive)


def test_a_failed_host_takes_nothing_over_and_its_error_is_kept_without_secrets(config):
    instance_id = store()
    secret = config.stripe_webhook_secret
    record = run_record(**{"janes-shop": {"ok": False, "error": f"docker said no {secret}"},
                           "not-ours": {"ok": True}})
    lines = sysadmin_runs.record(config, sysadmin_runs.parse(record))
    assert "janes-shop: stop.yml failed; nothing taken over" in lines
    assert "not stores of ours: not-ours" in lines
    with db_session:
        instance = Instance[instance_id]
        assert (instance.status, instance.admin_hold) == (StoreState.RUNNING, False)
        assert AnsibleRun.select().first().status == "failed"
        error = next(e.message for e in instance.logs if e.level == "error")
        assert "docker said no" in error and secret not in error


@pytest.mark.parametrize("junk", [[], {"playbook": "x.yml"}, {**run_record(), "hosts": 3},
                                  {**run_record(), "started_at": "yesterday"}])
def test_junk_is_refused_with_a_reason(config, junk):
    with pytest.raises(sysadmin_runs.BadRecord):
        sysadmin_runs.parse(junk)
    with db_session:
        assert not AnsibleRun.select().exists()


def test_record_run_command_reads_the_callbacks_json(config, base_env, tmp_path):
    store()
    env = {**base_env, "PROVISIONER_ENV_FILE": str(tmp_path / "none.env")}
    # ansible-playbook ran two playbooks: one record each, in order.
    done = subprocess.run([sys.executable, "-m", "provisioner.cli", "record-run"],
                          input=json.dumps([run_record(), run_record("playbooks/start.yml")]),
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.index("janes-shop: stopped") < done.stdout.index("janes-shop: running")
    refused = subprocess.run([sys.executable, "-m", "provisioner.cli", "record-run"],
                             input="not json", capture_output=True, text=True, env=env,
                             timeout=60)
    assert refused.returncode == 1 and "provisioner record-run:" in refused.stderr
