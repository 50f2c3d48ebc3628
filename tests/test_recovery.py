"""No dead ends: emails that never wait for playbooks and never go twice, welcome
emails that keep trying, failed stores that can be retried, a lost database refused."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from datetime import timedelta

import pytest
from aiosmtpd.controller import Controller
from pony.orm import db_session, flush

from provisioner import jobs, lifecycle, models
from provisioner.ansible import operations
from provisioner.config import ConfigError
from provisioner.models import Instance, Job, Notification, utcnow
from provisioner.states import JobKind, StoreState
from provisioner.testing.stack import free_port
from provisioner.worker import Worker


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Sink:
    """An SMTP server that keeps what it is sent; `on_message` runs on each one."""

    def __init__(self, on_message=None):
        self.messages: list[bytes] = []
        self.on_message = on_message

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(envelope.content)
        if self.on_message is not None:
            self.on_message()
        return "250 OK"


@pytest.fixture
def smtp():
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield sink, controller.port
    controller.stop()


def store(name: str, port: int, *, status: str = "running", welcome: bool = True,
          provisioned_ago: timedelta = timedelta(0)) -> int:
    with db_session:
        instance = Instance(subdomain=name, site_name=name, admin_email=f"{name}@example.com",
                            admin_password="tmp-Pass_123", port=port, status=status,
                            desired_state="running",
                            provisioned_at=utcnow() - provisioned_ago)
        if welcome:
            lifecycle.notify(instance, "welcome")
        return instance.id


def subjects(sink: Sink) -> list[str]:
    return [line.split(b":", 1)[1].strip().decode() for message in sink.messages
            for line in message.splitlines() if line.startswith(b"Subject:")]


class BlockingBackend:
    """An Ansible backend whose runs last until the test lets them end."""

    def __init__(self, real):
        self.real = real
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.set()
        self.release.wait(30)
        return self.real(*args, **kwargs)


def test_an_email_never_waits_for_a_running_playbook(config, smtp, recorded_runs):
    """Issue 14: in a burst, the first stores' welcome emails waited for later batches."""
    sink, port = smtp
    smtp_config = dataclasses.replace(config, email_host="127.0.0.1", email_port=port)
    with db_session:
        building = Instance(subdomain="slow-shop", site_name="s", admin_email="s@example.com",
                            port=19110, desired_state="running")
        jobs.enqueue(JobKind.CONVERGE, instance=building)
    store("ready-shop", 19111)
    backend = BlockingBackend(recorded_runs)
    operations.BACKEND = backend
    stop = threading.Event()
    worker = threading.Thread(target=Worker(smtp_config).run_forever, args=(stop,))
    worker.start()
    try:
        assert backend.started.wait(20), "the converge batch never started"
        wait_for(lambda: sink.messages, what="the welcome email during the batch")
        assert not backend.release.is_set()
    finally:
        backend.release.set()
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    assert subjects(sink) == ["Your store ready-shop is ready"]


def test_a_busy_database_after_a_send_never_sends_it_twice(config, smtp):
    """Issue 14: a DB held during a send produced two identical welcome emails."""
    sink, port = smtp
    smtp_config = dataclasses.replace(config, email_host="127.0.0.1", email_port=port)
    instance_id = store("locked-shop", 19112)
    holder = sqlite3.connect(config.database_path, timeout=5, isolation_level=None,
                             check_same_thread=False)

    def lock_for_a_while():
        holder.execute("BEGIN IMMEDIATE")  # another writer, right after the send
        threading.Timer(1.5, holder.execute, args=("COMMIT",)).start()

    sink.on_message = lock_for_a_while
    with db_session:
        models.db.execute("PRAGMA busy_timeout = 200")  # this thread's connection
    try:
        Worker(smtp_config).run_once()
        Worker(smtp_config).run_once()  # anything left to retry would send again
    finally:
        with db_session:
            models.db.execute(f"PRAGMA busy_timeout = {config.db_busy_timeout_seconds * 1000}")
        holder.close()
    assert len(sink.messages) == 1
    with db_session:
        instance = Instance[instance_id]
        assert instance.welcome_sent_at is not None and instance.admin_password is None
        assert Notification.get(instance=instance, notice="welcome").status == "sent"
        assert Job.select(lambda j: j.kind == "notify").first().state == "done"


def test_welcome_keeps_trying_past_max_attempts_and_alerts_the_admin(config):
    """Issue 14: with SMTP down ~75 s the welcome job gave up; the customer never got in."""
    port = free_port()
    smtp_config = dataclasses.replace(config, email_host="127.0.0.1", email_port=port,
                                      job_max_attempts=2, welcome_alert_after_minutes=5,
                                      admin_notify_email="ops@example.com")
    instance_id = store("patient-shop", 19113, provisioned_ago=timedelta(minutes=6))
    for _ in range(4):
        Worker(smtp_config).run_once()
        with db_session:
            for job in Job.select(lambda j: j.state == "queued"):
                job.next_run_at = utcnow()  # the backoff has passed
    with db_session:
        welcome = Job.select(lambda j: j.detail == "welcome|-").first()
        assert welcome.state == "queued" and welcome.attempts == 4, "must not give up"
        assert Instance[instance_id].admin_password == "tmp-Pass_123"
        assert Job.select(lambda j: j.detail == "admin_welcome_delayed|-").exists()
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        Worker(smtp_config).run_once()
    finally:
        controller.stop()
    assert sorted(subjects(sink)) == [
        "Your store patient-shop is ready",
        "[provisioner] store patient-shop: welcome email not sent yet"]
    with db_session:
        assert Instance[instance_id].admin_password is None


def test_a_failed_store_is_retried_to_running(config, recorded_runs):
    """Issue 14: `failed` was a dead end; only a new Stripe event revived it."""
    with db_session:
        instance = Instance(subdomain="failed-shop", site_name="f", admin_email="f@example.com",
                            port=19114, status="failed", desired_state="running",
                            admin_password="tmp-Pass_123")
        sub = models.Subscription(stripe_id="sub_retry", status="active",
                                  payment_confirmed=True)
        instance.subscription = sub
        lifecycle.retry(instance, config, by="admin")
        instance_id = instance.id
    Worker(config).run_once()
    with db_session:
        assert Instance[instance_id].status == StoreState.RUNNING
    assert [run[0] for run in recorded_runs.runs] == ["provision.yml"]


def test_a_running_store_is_not_retried(config):
    with db_session:
        instance = Instance(subdomain="fine-shop", site_name="f", admin_email="f@example.com",
                            port=19115, status="running", desired_state="running")
        with pytest.raises(lifecycle.RetryRefused, match="only failed"):
            lifecycle.retry(instance, config, by="admin")


def test_a_parked_store_retakes_its_name_unless_someone_took_it(config):
    with db_session:
        parked = Instance(subdomain="parked-shop", site_name="p", admin_email="p@example.com",
                          port=19116, status="needs_attention", desired_state="needs_attention",
                          live=False)
        other = Instance(subdomain="parked-shop", site_name="o", admin_email="o@example.com",
                         port=19117)
        with pytest.raises(lifecycle.RetryRefused, match="parked-shop now holds"):
            lifecycle.retry(parked, config, by="admin")
        other.live = False
        lifecycle.retry(parked, config, by="admin")
        assert parked.live and parked.status == StoreState.FAILED
        assert parked.desired_state == StoreState.PENDING  # no subscription: nothing to build


def test_a_lost_database_is_refused_not_replaced(config, tmp_path):
    data = tmp_path / "data"
    fresh = dataclasses.replace(config, data_dir=data)
    (data).mkdir()
    models._refuse_a_lost_database(fresh, fresh.database_path)  # first start: marker made
    fresh.database_path.write_bytes(b"")
    models._refuse_a_lost_database(fresh, fresh.database_path)  # DB there: fine
    fresh.database_path.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        models._refuse_a_lost_database(fresh, fresh.database_path)


def test_health_fails_when_the_database_file_is_gone(config):
    assert models.database_problem() is None
    moved = config.database_path.with_suffix(".moved")
    config.database_path.rename(moved)
    try:
        assert "missing" in models.database_problem()
    finally:
        moved.rename(config.database_path)
    assert models.database_problem() is None


def test_sync_queues_a_failed_store_again(config):
    """Issue 14: `sync` said "in step" about a store whose retries had run out."""
    from provisioner import maintenance

    with db_session:
        instance = Instance(subdomain="stuck-shop", site_name="s", admin_email="s@example.com",
                            port=19118, status="failed", desired_state="running",
                            status_message="docker unreachable")
        flush()
        instance_id = instance.id
    report = maintenance.sync(config)
    assert report.counts.get("corrected") == 1
    assert any("stuck-shop: failed earlier (docker unreachable)" in line for line in report.lines)
    with db_session:
        assert Instance[instance_id].status == StoreState.PROVISIONING
        assert Job.select(lambda j: j.kind == "converge" and j.state == "queued").exists()


class FailOnceBackend:
    """The first run fails every store the way Docker does when a port is taken."""

    def __init__(self, real):
        self.real = real
        self.failed = False

    def __call__(self, config, playbook, stores, *args, **kwargs):
        if self.failed:
            return self.real(config, playbook, stores, *args, **kwargs)
        self.failed = True
        from provisioner.ansible.runner import HostOutcome, RunResult
        return RunResult(ident="x", playbook=playbook, status="failed", rc=2,
                         artifact_dir=config.data_dir, hosts={
                             s["name"]: HostOutcome(ok=False, error=(
                                 "Error starting userland proxy: listen tcp4 "
                                 f"127.0.0.1:{s['port']}: bind: address already in use"))
                             for s in stores})


def test_a_store_whose_port_another_program_holds_moves_to_a_free_one(config,
                                                                       recorded_runs):
    """Issue 14: another process on the store's port left it failed for good."""
    import socket

    from provisioner import docker_hosts

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        with db_session:
            squat_config = dataclasses.replace(config, port_range_start=taken,
                                               port_range_end=taken + 20)
            assert docker_hosts.free_port(squat_config) != taken
            instance = Instance(subdomain="squat-shop", site_name="s",
                                admin_email="s@example.com", port=taken,
                                desired_state="running", status="failed")
            jobs.enqueue(JobKind.CONVERGE, instance=instance)
            flush()
            instance_id = instance.id
        operations.BACKEND = FailOnceBackend(recorded_runs)
        Worker(squat_config).run_once()
    finally:
        squatter.close()
    with db_session:
        instance = Instance[instance_id]
        assert instance.port != taken and instance.status == StoreState.RUNNING
    assert recorded_runs.runs[-1][1][0]["port"] == instance.port
