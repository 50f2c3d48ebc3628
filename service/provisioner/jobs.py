"""The durable job queue, in the database so it survives restarts.

A claimed job holds a lease; if its worker dies the lease runs out and the job
is claimed again (a live worker renews the leases of the jobs it holds,
`renew_leases`). Failures retry with exponential backoff and end `failed`,
with the error kept, after `max_attempts`.

On PostgreSQL several workers (processes, machines) claim from one queue. A claim
is one short transaction that first takes the advisory lock CLAIM_LOCK: claims
are serialised, and since PostgreSQL's READ COMMITTED gives every statement the
data committed before it began, each claimer sees every earlier claim, so the
"one running job per store" check holds across workers (row locks alone,
SELECT ... FOR UPDATE SKIP LOCKED, would not: two claimers could each take a
different job of one store). Its candidate rows are also taken FOR UPDATE SKIP
LOCKED, so a claim never waits for, nor overwrites, a job row another
transaction is changing (an enqueue moving it earlier). SQLite has one writer at
a time and none of this.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from datetime import datetime, timedelta

from pony.orm import db_session, select

from provisioner import models
from provisioner.models import Instance, Job, LogEntry, StripeEvent, utcnow
from provisioner.states import JobKind, JobState

QUEUED, RUNNING, DONE, FAILED = (s.value for s in JobState)

LEASE = timedelta(minutes=15)
BACKOFF_CAP = timedelta(hours=1)


class Final(Exception):
    """A job that cannot succeed by being tried again: failed at once, with this reason."""


def enqueue(kind: str, *, instance: Instance | None = None, event: StripeEvent | None = None,
            detail: str | None = None, delay: timedelta = timedelta(0)) -> Job:
    """Queue a job unless an identical one is already waiting (needs a db_session).

    An identical waiting job is moved earlier if this one is due sooner.

    On PostgreSQL two transactions queueing the same job are serialised by an advisory
    lock on what the job is (held until the enqueuer commits), so the second sees the
    first's job; the waiting row is taken FOR UPDATE, so a worker claiming it at the
    same moment either has it already (then a new job is queued: what this enqueue
    asks for happens after the claimed run read the store) or waits for this commit.
    """
    run_at = utcnow() + delay
    waiting = select(
        j for j in Job
        if j.kind == kind and j.instance == instance and j.event == event
        and j.detail == detail and j.state == QUEUED
    )
    if models.shared_database():
        _advisory_xact_lock(models.ENQUEUE_LOCK, zlib.crc32(
            f"{kind}|{instance.id if instance else ''}|{event.id if event else ''}|"
            f"{detail or ''}".encode()) - 2 ** 31)
        waiting = waiting.order_by(Job.id).for_update()
    waiting = waiting.first()
    if waiting is not None:
        waiting.next_run_at = min(waiting.next_run_at, run_at)
        return waiting
    return Job(kind=str(kind), instance=instance, event=event, detail=detail, next_run_at=run_at)


def claim_due(limit: int = 100, kinds: Iterable[str] | None = None,
              new_stores: bool | None = None) -> list[int]:
    """Take due jobs of `kinds` (all when None), at most one per instance among those
    kinds, marking them running (needs a db_session). Lanes of different kinds do not
    hold each other up: an email never waits for a playbook.

    `new_stores`: True, only the converge jobs of stores never provisioned yet (the
    signups lane); False, all but those (the other ansible lane); None, all. Still one
    job per store among all of `kinds`.

    On PostgreSQL call it first thing in its own db_session, committed at once (as the
    worker does): the claim lock is taken here and held until that commit."""
    shared = models.shared_database()
    if shared:
        _advisory_xact_lock(models.CLAIM_LOCK)
    now = utcnow()
    wanted = sorted(str(k) for k in kinds) if kinds is not None else None
    running = select(j for j in Job if j.state == RUNNING and j.locked_until > now)
    if wanted is not None:
        running = running.filter(lambda j: j.kind in wanted)
    busy = set(select(j.instance.id for j in running if j.instance is not None))
    # Jobs without a store (maintenance) run one of a kind at a time.
    busy_kinds = set(select(j.kind for j in running if j.instance is None))
    due = select(
        j for j in Job
        if (j.state == QUEUED and j.next_run_at <= now)
        or (j.state == RUNNING and j.locked_until <= now)
    )
    if wanted is not None:
        due = due.filter(lambda j: j.kind in wanted)
    if new_stores is True:
        converge = str(JobKind.CONVERGE)
        due = due.filter(lambda j: j.kind == converge)
    due = due.order_by(Job.id)
    if shared:
        due = due.for_update(skip_locked=True)
    claimed: list[int] = []
    for job in due:
        if new_stores is not None and _builds_a_new_store(job) != new_stores:
            continue
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


def _advisory_xact_lock(*key: int) -> None:
    """PostgreSQL's transaction-scoped advisory lock: waits for it, holds it until this
    transaction ends. Starts the transaction (Pony reads in autocommit until a write)."""
    if len(key) == 1:
        models.db.execute("SELECT pg_advisory_xact_lock($(key[0]))")
    else:
        models.db.execute("SELECT pg_advisory_xact_lock($(key[0]), $(key[1]))")


def lease_of(job_id: int) -> datetime | None:
    """The lease a job holds now (needs a db_session): what renew_leases is given."""
    return Job[job_id].locked_until


def renew_leases(held: dict[int, datetime]) -> dict[int, datetime]:
    """Extend the leases of running jobs this worker holds (job id: the lease it set),
    so a run that outlasts LEASE, or a job waiting behind another run of its claim, is
    never taken over while its worker lives. A job no longer running under that lease
    (finished, or failed and claimed by someone else) is left alone. Returns the new
    leases of the jobs renewed. Its own transaction."""
    if not held:
        return {}
    renewed: dict[int, datetime] = {}
    until = utcnow() + LEASE
    ids = list(held)
    with db_session:
        rows = select(j for j in Job if j.id in ids)
        if models.shared_database():
            rows = rows.for_update(skip_locked=True)  # one being finished: left alone
        for job in rows:
            if job.state == RUNNING and job.locked_until == held[job.id]:
                job.locked_until = until
                renewed[job.id] = until
    return renewed


def _builds_a_new_store(job: Job) -> bool:
    return (job.kind == JobKind.CONVERGE and job.instance is not None
            and job.instance.provisioned_at is None)


def complete(job: Job) -> None:
    job.state = DONE
    job.finished_at = utcnow()
    job.locked_until = None
    job.last_error = None


def fail(job: Job, error: str, *, max_attempts: int | None, base_seconds: int,
         cap: timedelta = BACKOFF_CAP, floor: timedelta = timedelta(0)) -> bool:
    """Record a failure; True if the job will be retried, False if it gave up.

    `max_attempts=None` retries for as long as the job is wanted (a welcome email);
    such a job needs a `floor` so it can never spin."""
    job.last_error = error
    job.locked_until = None
    LogEntry(level="error", message=f"{job.kind} job {job.id} attempt {job.attempts}: {error}",
             instance=job.instance, job=job)
    if max_attempts is not None and job.attempts >= max_attempts:
        job.state = FAILED
        job.finished_at = utcnow()
        return False
    delay = max(min(timedelta(seconds=base_seconds * 2 ** min(job.attempts - 1, 20)), cap),
                floor)
    job.state = QUEUED
    job.next_run_at = utcnow() + delay
    return True


def release(job: Job, reason: str) -> None:
    """Hand a claimed job back untried (its run was cancelled): no attempt is counted."""
    job.state, job.locked_until, job.next_run_at = QUEUED, None, utcnow()
    job.attempts = max(job.attempts - 1, 0)
    LogEntry(level="warning", message=f"{job.kind} job {job.id} queued again: {reason}",
             instance=job.instance, job=job)


def give_up(job: Job, error: str) -> None:
    """Fail at once: retrying cannot help (an admin has to decide)."""
    job.state, job.last_error, job.finished_at, job.locked_until = FAILED, error, utcnow(), None
    LogEntry(level="error", message=f"{job.kind} job {job.id}: {error}", instance=job.instance,
             job=job)


def pending_count() -> int:
    return select(j for j in Job if j.state in (QUEUED, RUNNING)).count()
