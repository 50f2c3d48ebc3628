"""The worker: drains the job queue.

Each job is claimed, run and recorded in separate short transactions; no
transaction is open while a playbook runs, so the webhook's insert never waits
for Ansible. Store jobs due together go into one ansible run per operation
(convergence.py); events, reconciles and emails are quick DB work; the
maintenance kinds are the CLI's operations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from pony.orm import db_session, select

from provisioner import convergence, events, jobs, lifecycle, maintenance, notifications
from provisioner.ansible import operations
from provisioner.config import Config
from provisioner.convergence import Batch
from provisioner.models import Instance, Job, LogEntry, utcnow
from provisioner.redaction import redact
from provisioner.states import MAINTENANCE_KINDS, JobKind, JobState, StoreState

log = logging.getLogger(__name__)


def recover_abandoned() -> int:
    """Requeue jobs a previous worker left running (run one worker per database)."""
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

    def _cancelled(self) -> bool:
        """True once the worker was asked to stop and the grace for the run is over."""
        if not self.stop.is_set():
            return False
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return time.monotonic() - self._stop_seen >= self.config.stop_grace_seconds

    # -- loop ----------------------------------------------------------------

    def run_forever(self, stop: threading.Event, paused: threading.Event | None = None) -> None:
        self.stop = stop
        recover_abandoned()
        while not stop.is_set():
            if paused is not None and paused.is_set():
                stop.wait(0.2)
                continue
            try:
                self.run_once()
            except Exception:  # keep the worker alive; the job records say what failed
                log.exception("worker iteration failed")
            self.wake.wait(self.config.worker_poll_seconds)
            self.wake.clear()

    def run_once(self) -> int:
        """Process every due job, including the ones this creates; return how many."""
        handled = 0
        while True:
            with db_session:
                claimed = jobs.claim_due()
                kinds = {job_id: Job[job_id].kind for job_id in claimed}
            if not claimed:
                return handled
            handled += len(claimed)
            by_kind: dict[str, list[int]] = {}
            for job_id in claimed:
                by_kind.setdefault(kinds[job_id], []).append(job_id)
            self._dispatch(by_kind)

    def _dispatch(self, by_kind: dict[str, list[int]]) -> None:
        for job_id in by_kind.pop(JobKind.EVENT, []):
            self._in_transaction(job_id, self._apply_event)
        for job_id in by_kind.pop(JobKind.RECONCILE, []):
            self._in_transaction(job_id, self._reconcile)
        self._batches(convergence.plan_converge, by_kind.pop(JobKind.CONVERGE, []))
        self._batches(self._plan_actions, by_kind.pop(JobKind.ACTION, []))
        self._batches(lambda ids: convergence.plan_destroy(self.config, ids),
                      by_kind.pop(JobKind.DESTROY, []))
        for job_id in by_kind.pop(JobKind.NOTIFY, []):
            self._in_transaction(job_id, self._notify)
        for kind in MAINTENANCE_KINDS:
            for job_id in by_kind.pop(kind, []):
                self._maintenance(job_id, kind)
        for kind, ids in by_kind.items():
            for job_id in ids:
                self._fail(job_id, f"unknown job kind {kind!r}")

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

    def _notify(self, job: Job) -> None:
        notice, _, key = (job.detail or "").partition("|")
        if notice == "welcome" and job.instance.status != StoreState.RUNNING:
            return  # the store went away before it was ready; no login to send
        notifications.send_notice(self.config, job.instance, notice, key or "-")

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

    def _plan_actions(self, job_ids: list[int]) -> list[Batch]:
        batches, refused = convergence.plan_actions(job_ids)
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
            if outcome.conflict:
                self._conflict(job_id, outcome.error)
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

    def _fail(self, job_id: int, error: str) -> None:
        with db_session:
            job = Job[job_id]
            error = redact(error, self._secrets_of([job.instance] if job.instance else []))
            retrying = jobs.fail(job, error, max_attempts=self.config.job_max_attempts,
                                 base_seconds=self.config.job_retry_base_seconds)
            if job.event is not None:
                job.event.error = error
                job.event.failed_at = None if retrying else utcnow()
            if job.kind in (JobKind.CONVERGE, JobKind.DESTROY) and job.instance is not None:
                lifecycle.failed(job.instance, error, retrying)
        log.warning("job %s failed (%s): %s", job_id, "retrying" if retrying else "gave up", error)

    def _conflict(self, job_id: int, error: str) -> None:
        """Something not ours holds the store's name: an admin decides, nothing retries."""
        with db_session:
            job = Job[job_id]
            jobs.give_up(job, error)
            lifecycle.needs_attention(job.instance, error)
        log.warning("job %s: %s", job_id, error)

    def _secrets_of(self, instances: Iterable[Instance]) -> list[str]:
        values = [i.admin_password for i in instances if i and i.admin_password]
        return values + self.config.secrets()


def serve_worker(config: Config, stop: threading.Event, wake: threading.Event,
                 paused: threading.Event | None = None) -> threading.Thread:
    thread = threading.Thread(target=Worker(config, wake).run_forever, args=(stop, paused),
                              name="provisioner-worker", daemon=True)
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
