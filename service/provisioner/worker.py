"""The worker: drains the job queue, in lanes (billing, email, ansible) that
never wait for each other.

Each job is claimed, run and recorded in separate short transactions; no
transaction is open while a playbook runs or an email is sent, so the webhook's
insert never waits for Ansible or SMTP. Store jobs due together go into one
ansible run per operation (convergence.py); events and reconciles are quick DB
work; the maintenance kinds are the CLI's operations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from pony.orm import db_session, select

from provisioner import (
    alerts,
    backups,
    convergence,
    docker_hosts,
    domains,
    events,
    jobs,
    lifecycle,
    mailer,
    maintenance,
    models,
    moves,
    notifications,
    store_plans,
)
from provisioner.ansible import operations, recording
from provisioner.config import Config
from provisioner.convergence import Batch
from provisioner.models import Instance, Job, LogEntry, utcnow
from provisioner.plans import Plan
from provisioner.redaction import redact
from provisioner.states import CARE_KINDS, MAINTENANCE_KINDS, JobKind, JobState, StoreState

log = logging.getLogger(__name__)


# Each lane is a thread with its own claims: an email never waits for a playbook,
# and a Stripe event is applied while a batch runs.
LANES: dict[str, tuple[str, ...]] = {
    "billing": (JobKind.EVENT, JobKind.RECONCILE),
    "email": (JobKind.NOTIFY,),
    "ansible": (JobKind.CONVERGE, JobKind.ACTION, JobKind.DESTROY, *MAINTENANCE_KINDS,
                *CARE_KINDS),
    # A paying customer's first provisioning never waits for a fleet batch (a sweep,
    # a sync, an upgrade) to end: a second ansible run beside it. It alone builds the
    # stores never provisioned, which no fleet operation touches (so the first stores
    # of a host never race to create its network in two runs); one job per store
    # across both.
    "signups": (JobKind.CONVERGE, JobKind.ACTION, JobKind.DESTROY, *MAINTENANCE_KINDS),
}
# The module that does each care job (the others: backups).
CARE_RUNS = {JobKind.DOMAIN: domains.run_job, JobKind.MOVE: moves.run_job}
# Which stores' converge jobs a lane takes: True only new ones, False all but those.
NEW_STORES: dict[str, bool] = {"ansible": False, "signups": True}
# Emails are retried for as long as they matter (a welcome only while its store
# runs), at most this far apart.
EMAIL_BACKOFF_CAP = timedelta(minutes=15)
EMAIL_BACKOFF_FLOOR = timedelta(seconds=2)
# How often a worker sharing its database renews the leases of the jobs it holds.
LEASE_RENEW_SECONDS = jobs.LEASE.total_seconds() / 5


def recover_abandoned(config: Config | None = None) -> int:
    """Requeue jobs a previous worker left running, and end the playbooks it left
    behind (run one worker per SQLite database). On PostgreSQL several workers share
    the queue: a running job may be a live worker's, so nothing is taken from it here;
    a dead worker's jobs are claimed again when their lease runs out (jobs.LEASE)."""
    if models.shared_database():
        return 0
    if config is not None:
        for line in recording.recover_abandoned_runs(config):
            log.warning("%s", line)
    with db_session:
        abandoned = select(j for j in Job if j.state == JobState.RUNNING.value)[:]
        for job in abandoned:
            job.state = JobState.QUEUED.value
            job.locked_until = None
            job.next_run_at = utcnow()
            LogEntry(job=job, instance=job.instance, level="warning",
                     message=f"{job.kind} job {job.id} was left running; queued again")
        return len(abandoned)


class Worker:
    def __init__(self, config: Config, wake: threading.Event | None = None,
                 stop: threading.Event | None = None):
        self.config = config
        self.wake = wake or threading.Event()
        self.stop = stop or threading.Event()
        self._stop_seen: float | None = None
        self._lane_wakes: dict[str, threading.Event] = {}
        self._pause: Pause | None = None
        # Lanes of one worker claim one at a time (two claiming the same job would
        # make one fail its write).
        self._claiming = threading.Lock()
        # The running jobs this worker holds and their leases, renewed on PostgreSQL.
        self._held: dict[int, datetime] = {}
        self._held_lock = threading.Lock()

    def _cancelled(self) -> bool:
        """True once the worker was asked to stop and the grace for the run is over."""
        if not self.stop.is_set():
            return False
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return time.monotonic() - self._stop_seen >= self.config.stop_grace_seconds

    # -- loop ----------------------------------------------------------------

    def run_forever(self, stop: threading.Event, paused: Pause | None = None) -> None:
        """Run every lane until `stop`; then let the current run finish or cancel it
        (STOP_GRACE_SECONDS) and return with no job of ours left running."""
        self.stop = stop
        self._pause = paused
        recover_abandoned(self.config)
        self._lane_wakes = {name: threading.Event() for name in LANES}
        lanes = [threading.Thread(target=self._lane, args=(name, paused), daemon=True,
                                  name=f"provisioner-worker-{name}") for name in LANES]
        for lane in lanes:
            lane.start()
        lanes_done = threading.Event()
        if models.shared_database():
            threading.Thread(target=self._renew_leases, args=(lanes_done,), daemon=True,
                             name="provisioner-worker-leases").start()
        while not stop.is_set():
            self.wake.wait(self.config.worker_poll_seconds)
            self.wake.clear()
            self._poke()
        self._poke()
        for lane in lanes:
            lane.join(self.config.stop_grace_seconds + 30)
        lanes_done.set()
        log.info("worker stopped")

    def _renew_leases(self, done: threading.Event) -> None:
        """Other workers share the queue (PostgreSQL): keep the leases of the jobs this
        one holds from running out while it lives (a long run, a job waiting behind
        another run of its claim); only a dead worker's jobs are taken over."""
        while not done.wait(LEASE_RENEW_SECONDS):
            with self._held_lock:
                held = dict(self._held)
            try:
                renewed = jobs.renew_leases(held)
            except Exception:  # the next round tries again, well within the lease
                log.warning("could not renew the leases of jobs %s", sorted(held),
                            exc_info=True)
                continue
            with self._held_lock:
                for job_id, until in renewed.items():
                    if job_id in self._held:
                        self._held[job_id] = until

    def _poke(self) -> None:
        for event in self._lane_wakes.values():
            event.set()

    def _lane(self, name: str, paused: Pause | None) -> None:
        wake = self._lane_wakes[name]
        while not self.stop.is_set():
            if paused is not None and not paused.enter():
                self.stop.wait(0.2)
                continue
            try:
                if self.run_once(LANES[name], new_stores=NEW_STORES.get(name)):
                    self._poke()  # what was done may have queued work for another lane
            except Exception:  # keep the lane alive; the job records say what failed
                log.exception("worker lane %s failed", name)
            finally:
                if paused is not None:
                    paused.leave()
            wake.wait(self.config.worker_poll_seconds)
            wake.clear()

    def run_once(self, kinds: tuple[str, ...] | None = None,
                 new_stores: bool | None = None) -> int:
        """Process every due job (of `kinds`), including the ones this creates; return
        how many. Stops claiming once the worker is asked to stop."""
        handled = 0
        while not self.stop.is_set() and not (self._pause and self._pause.is_set()):
            with self._claiming, db_session:
                claimed = jobs.claim_due(kinds=kinds, new_stores=new_stores)
                kinds_of = {job_id: Job[job_id].kind for job_id in claimed}
                leases = {job_id: jobs.lease_of(job_id) for job_id in claimed}
            if not claimed:
                return handled
            handled += len(claimed)
            by_kind: dict[str, list[int]] = {}
            for job_id in claimed:
                by_kind.setdefault(kinds_of[job_id], []).append(job_id)
            with self._held_lock:
                self._held.update(leases)
            try:
                self._dispatch(by_kind)
            finally:
                with self._held_lock:
                    for job_id in claimed:
                        self._held.pop(job_id, None)
        return handled

    def _dispatch(self, by_kind: dict[str, list[int]]) -> None:
        for job_id in by_kind.pop(JobKind.EVENT, []):
            self._in_transaction(job_id, self._apply_event)
        for job_id in by_kind.pop(JobKind.RECONCILE, []):
            self._in_transaction(job_id, self._reconcile)
        for job_id in by_kind.pop(JobKind.NOTIFY, []):
            self._notify(job_id)
        self._batches(lambda ids: convergence.plan_converge(self.config, ids),
                      self._unless_stopping(by_kind, JobKind.CONVERGE))
        self._batches(self._plan_actions, self._unless_stopping(by_kind, JobKind.ACTION))
        self._batches(lambda ids: convergence.plan_destroy(self.config, ids),
                      self._unless_stopping(by_kind, JobKind.DESTROY))
        for kind in MAINTENANCE_KINDS:
            for job_id in self._unless_stopping(by_kind, kind):
                self._maintenance(job_id, kind)
        for kind in CARE_KINDS:
            for job_id in self._unless_stopping(by_kind, kind):
                self._care(job_id, CARE_RUNS.get(kind, backups.run_job))
        for kind, ids in by_kind.items():
            for job_id in ids:
                self._fail(job_id, f"unknown job kind {kind!r}")

    def _unless_stopping(self, by_kind: dict[str, list[int]], kind: str) -> list[int]:
        """The claimed jobs of `kind`, or none if the worker is stopping: those are
        handed back untried rather than started now."""
        job_ids = by_kind.pop(kind, [])
        if self.stop.is_set():
            for job_id in job_ids:
                self._release(job_id, "the worker is stopping")
            return []
        return job_ids

    # -- quick jobs: one transaction each ------------------------------------

    def _in_transaction(self, job_id: int, work: Callable[[Job], None]) -> None:
        """A job that is only DB work: done in one transaction; any error retries it."""
        try:
            with db_session:
                job = Job[job_id]
                work(job)
                jobs.complete(job)
        except Exception as exc:  # every failure is recorded on the job and retried
            self._fail(job_id, f"{type(exc).__name__}: {exc}")

    def _apply_event(self, job: Job) -> None:
        events.apply(self.config, job.event)

    def _reconcile(self, job: Job) -> None:
        if job.instance.live:
            lifecycle.reconcile(job.instance, self.config)

    # -- emails: committed as "sending", sent with no transaction open, recorded --

    def _notify(self, job_id: int) -> None:
        try:
            with db_session:
                job = Job[job_id]
                outgoing = self._outgoing(job)
                if outgoing is None:
                    jobs.complete(job)
        except Exception as exc:  # a render or DB failure: retried like a send failure
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
            return
        if outgoing is None:
            return
        try:
            where = mailer.send(self.config, outgoing.message)
        except Exception as exc:  # SMTP down, refused or timed out: retried with backoff
            self._quietly(lambda: notifications.not_sent(outgoing))
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
            return
        self._record_durably(lambda: (notifications.sent(outgoing, where),
                                      jobs.complete(Job[job_id])))
        if outgoing.notice == "welcome":
            models.checkpoint_wal()  # the password we just deleted, out of the WAL too

    def _outgoing(self, job: Job) -> notifications.Outgoing | None:
        notice, _, rest = (job.detail or "").partition("|")
        key, _, text = rest.partition("|")
        instance = job.instance
        if notice == "welcome" and instance.status != StoreState.RUNNING:
            return None  # the store went away before it was ready; no login to send
        # The store's status message is for admins; a customer's email says only its text.
        detail = text or (instance.status_message or "" if notice.startswith("admin_") else "")
        if notice == "admin_welcome_delayed":
            welcome = instance.jobs.select(
                lambda j: j.kind == JobKind.NOTIFY and j.detail == "welcome|-").first()
            detail = (welcome.last_error or "") if welcome else ""
        return notifications.prepare(self.config, instance, notice, key or "-",
                                     detail=redact(detail, self._secrets_of([instance])))

    def _record_durably(self, work: Callable[[], object]) -> None:
        """Record what already happened outside (an email sent, a run ended), however
        long the database is busy, so the job is never run, and the email never sent,
        twice, and never held for its whole lease."""
        models.record_durably(work, "a finished job", log)

    @staticmethod
    def _quietly(work: Callable[[], object]) -> None:
        try:
            with db_session:
                work()
        except Exception:  # best effort: a leftover "sending" row only means a resend
            log.warning("could not clear a failed send's record", exc_info=True)

    # -- long jobs: claim, run with no transaction open, record -------------

    def _maintenance(self, job_id: int, kind: str) -> None:
        """A scheduled health/sync/nginx/cleanup run: the CLI's operation, logged."""
        try:
            report = maintenance.run(self.config, kind)
        except Exception as exc:
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
            return
        with db_session:
            job = Job[job_id]
            LogEntry(job=job, level="warning" if report.failed else "info",
                     message="\n".join([report.summary(), *report.lines])[:4000])
            jobs.complete(job)

    def _care(self, job_id: int, run: Callable[[Config, int], str]) -> None:
        """A backup, restore, clone or domain step: its module runs it (no transaction
        open across its playbook or network calls) and raises what failed, to retry."""
        try:
            message = run(self.config, job_id)
        except jobs.Final as exc:
            with db_session:
                jobs.give_up(Job[job_id], str(exc))
            return
        except Exception as exc:
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
            return
        with db_session:
            job = Job[job_id]
            LogEntry(instance=job.instance, job=job, message=message[:4000])
            jobs.complete(job)

    def _plan_actions(self, job_ids: list[int]) -> list[Batch]:
        batches, refused = convergence.plan_actions(self.config, job_ids)
        for job_id, reason in refused:
            self._fail(job_id, reason)
        return batches

    def _batches(self, plan: Callable[[list[int]], list[Batch]], job_ids: list[int]) -> None:
        if not job_ids:
            return
        try:
            for batch in plan(job_ids):
                self._run_batch(batch)
        except Exception as exc:  # never leave a claimed job hanging
            log.exception("batch of %s failed", job_ids)
            with db_session:
                unfinished = [j for j in job_ids if Job[j].state == JobState.RUNNING]
            for job_id in unfinished:
                self._fail(job_id, f"{type(exc).__name__}: {exc}")

    def _run_batch(self, batch: Batch) -> None:
        """One ansible run for the batch; each job succeeds or fails on its own store."""
        job_of = {store.name: job_id for job_id, store in batch.jobs.items()}
        with db_session:
            redact_values = self._secrets_of(Job[j].instance for j in batch.jobs)
        try:
            result = operations.run(self.config, batch.operation, batch.jobs.values(),
                                    secrets=batch.secrets, jobs=job_of, redact=redact_values,
                                    cancel=self._cancelled)
        except Exception as exc:  # ansible-runner itself failed: every job retries
            for job_id in batch.jobs:
                self._fail(job_id, f"ansible-runner: {type(exc).__name__}: {exc}")
            return
        for name, job_id in job_of.items():
            outcome = result.hosts[name]
            if outcome.cancelled:
                self._release(job_id, outcome.error or "run cancelled")
            elif result.timed_out:
                self._fail(job_id, outcome.error or "ansible run timed out", alert=True)
            elif outcome.conflict:
                self._conflict(job_id, outcome.error)
            elif outcome.plan_refused and job_id in batch.plans:
                self._plan_refused(job_id, batch.plans[job_id], outcome.error)
            elif not outcome.ok:
                self._fail(job_id, outcome.error or "failed")
            else:
                with db_session:
                    job = Job[job_id]
                    LogEntry(instance=job.instance, job=job, ansible_run=result.run_id,
                             message=f"{batch.operation} done ({outcome.changed} changed) "
                                     f"in run {result.ident}")
                    jobs.complete(job)
                    batch.on_success(job.instance)

    # -- failures ------------------------------------------------------------

    def _fail(self, job_id: int, error: str, alert: bool = False) -> None:
        """Record a failure: retried with backoff, visible on the job and its store; the
        admin hears of a run that timed out and of a store whose retries ran out.
        Written however long the database stays unwritable (a full disk): a failure
        left unrecorded would hold its job for the whole lease."""
        outcome: dict[str, object] = {}
        self._record_durably(lambda: outcome.update(self._record_failure(job_id, error, alert)))
        log.warning("job %s failed (%s): %s", job_id,
                    "retrying" if outcome.get("retrying") else "gave up",
                    outcome.get("error", "(not recorded)"))

    def _record_failure(self, job_id: int, error: str, alert: bool) -> dict[str, object]:
        """The failure's records (needs a db_session): will it retry, the shown error."""
        job = Job[job_id]
        instance = job.instance
        error = redact(error, self._secrets_of([instance] if instance else []))
        email = job.kind == JobKind.NOTIFY
        retrying = jobs.fail(
            job, error, base_seconds=self.config.job_retry_base_seconds,
            max_attempts=None if email else self.config.job_max_attempts,
            cap=EMAIL_BACKOFF_CAP if email else jobs.BACKOFF_CAP,
            floor=EMAIL_BACKOFF_FLOOR if email else timedelta(0))
        if job.event is not None:
            job.event.error = error
            job.event.failed_at = None if retrying else utcnow()
        if job.kind == JobKind.CONVERGE and retrying and instance is not None:
            docker_hosts.move_if_port_taken(self.config, instance, error)
        if job.kind in (JobKind.CONVERGE, JobKind.DESTROY) and instance is not None:
            lifecycle.failed(instance, error, retrying)
            if alert or not retrying:
                alerts.raise_alert("provision_failed", f"store {instance.subdomain}: {job.kind} "
                                   f"failed: {error}", instance)
        if email and (job.detail or "").startswith("welcome|"):
            self._welcome_overdue(instance)
        return {"retrying": retrying, "error": error}

    def _welcome_overdue(self, instance: Instance) -> None:
        """A store that runs without its customer having their login: tell the admin once."""
        since = instance.provisioned_at
        bound = timedelta(minutes=self.config.welcome_alert_after_minutes)
        if since is not None and utcnow() - since >= bound:
            lifecycle.notify(instance, "admin_welcome_delayed")

    def _release(self, job_id: int, reason: str) -> None:
        with db_session:
            job = Job[job_id]
            jobs.release(job, reason)
            if job.instance is not None:
                job.instance.status_message = f"queued again: {reason}"

    def _conflict(self, job_id: int, error: str) -> None:
        """Something not ours holds the store's name: an admin decides, nothing retries."""
        with db_session:
            job = Job[job_id]
            jobs.give_up(job, error)
            lifecycle.needs_attention(job.instance, error)
        log.warning("job %s: %s", job_id, error)

    def _plan_refused(self, job_id: int, plan: Plan, error: str) -> None:
        """The store keeps its plan; it still goes to the state billing says, with it."""
        with db_session:
            job = Job[job_id]
            store_plans.refused(job.instance, plan, error)
            jobs.complete(job)
            lifecycle.reconcile(job.instance, self.config)
        log.warning("job %s: %s", job_id, error)

    def _secrets_of(self, instances: Iterable[Instance]) -> list[str]:
        values = [i.admin_password for i in instances if i and i.admin_password]
        return values + self.config.secrets()


class Pause:
    """A hold on the worker's lanes (tests use it to act alone on the stack): once
    `set()` returns, no lane is inside a job and none claims one until `clear()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._inside = 0

    def is_set(self) -> bool:
        return self._held

    def set(self, timeout: float = 300) -> None:
        with self._cond:
            self._held = True
            if not self._cond.wait_for(lambda: self._inside == 0, timeout):
                raise TimeoutError(f"the worker's lanes were still busy after {timeout} s")

    def clear(self) -> None:
        with self._cond:
            self._held = False

    def enter(self) -> bool:
        with self._cond:
            if self._held:
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()


def serve_worker(config: Config, stop: threading.Event, wake: threading.Event,
                 paused: Pause | None = None) -> threading.Thread:
    """The worker in a thread of this process (a service in one process, as the
    integration tests run it, pausing it at will); join it after `stop` for a graceful
    stop. `serve` runs it as a process of its own (worker_process)."""
    thread = threading.Thread(target=Worker(config, wake, stop).run_forever,
                              args=(stop, paused), name="provisioner-worker", daemon=True)
    thread.start()
    return thread


def drain(config: Config, timeout: float = 300) -> int:
    """Run the worker until no job is due (for the CLI and tests)."""
    worker = Worker(config)
    deadline = time.monotonic() + timeout
    handled = 0
    while time.monotonic() < deadline:
        done = worker.run_once()
        handled += done
        if done == 0:
            return handled
    return handled
