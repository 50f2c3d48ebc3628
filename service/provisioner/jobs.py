"""The durable job queue, in the database so it survives restarts.

A claimed job holds a lease; if its worker dies the lease runs out and the job
is claimed again. Failures retry with exponential backoff and end `failed`,
with the error kept, after `max_attempts`.
"""

from __future__ import annotations

from datetime import timedelta

from pony.orm import select

from provisioner.models import Instance, Job, LogEntry, StripeEvent, utcnow
from provisioner.states import JobState

QUEUED, RUNNING, DONE, FAILED = (s.value for s in JobState)

LEASE = timedelta(minutes=15)
BACKOFF_CAP = timedelta(hours=1)


def enqueue(kind: str, *, instance: Instance | None = None, event: StripeEvent | None = None,
            detail: str | None = None, delay: timedelta = timedelta(0)) -> Job:
    """Queue a job unless an identical one is already waiting (needs a db_session).

    An identical waiting job is moved earlier if this one is due sooner.
    """
    run_at = utcnow() + delay
    waiting = select(
        j for j in Job
        if j.kind == kind and j.instance == instance and j.event == event
        and j.detail == detail and j.state == QUEUED
    ).first()
    if waiting is not None:
        waiting.next_run_at = min(waiting.next_run_at, run_at)
        return waiting
    return Job(kind=str(kind), instance=instance, event=event, detail=detail, next_run_at=run_at)


def claim_due(limit: int = 100) -> list[int]:
    """Take due jobs, at most one per instance, marking them running (needs a db_session)."""
    now = utcnow()
    busy = set(select(
        j.instance.id for j in Job
        if j.state == RUNNING and j.locked_until > now and j.instance is not None
    ))
    # Jobs without a store (maintenance) run one of a kind at a time.
    busy_kinds = set(select(
        j.kind for j in Job
        if j.state == RUNNING and j.locked_until > now and j.instance is None
    ))
    due = select(
        j for j in Job
        if (j.state == QUEUED and j.next_run_at <= now)
        or (j.state == RUNNING and j.locked_until <= now)
    ).order_by(Job.id)
    claimed: list[int] = []
    for job in due:
        if job.instance is not None:
            if job.instance.id in busy:
                continue
            busy.add(job.instance.id)
        elif job.event is None:
            if job.kind in busy_kinds:
                continue
            busy_kinds.add(job.kind)
        job.state = RUNNING
        job.attempts += 1
        job.locked_until = now + LEASE
        claimed.append(job.id)
        if len(claimed) >= limit:
            break
    return claimed


def complete(job: Job) -> None:
    job.state = DONE
    job.finished_at = utcnow()
    job.locked_until = None
    job.last_error = None


def fail(job: Job, error: str, *, max_attempts: int, base_seconds: int) -> bool:
    """Record a failure; True if the job will be retried, False if it gave up."""
    job.last_error = error
    job.locked_until = None
    LogEntry(level="error", message=f"{job.kind} job {job.id} attempt {job.attempts}: {error}",
             instance=job.instance, job=job)
    if job.attempts >= max_attempts:
        job.state = FAILED
        job.finished_at = utcnow()
        return False
    delay = min(timedelta(seconds=base_seconds * 2 ** (job.attempts - 1)), BACKOFF_CAP)
    job.state = QUEUED
    job.next_run_at = utcnow() + delay
    return True


def give_up(job: Job, error: str) -> None:
    """Fail at once: retrying cannot help (an admin has to decide)."""
    job.state, job.last_error, job.finished_at, job.locked_until = FAILED, error, utcnow(), None
    LogEntry(level="error", message=f"{job.kind} job {job.id}: {error}", instance=job.instance,
             job=job)


def pending_count() -> int:
    return select(j for j in Job if j.state in (QUEUED, RUNNING)).count()
