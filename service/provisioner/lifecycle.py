"""From what we know about billing, the state a store should be in.

`desired_state` is the single place that decides; event handlers only record
facts and then call `reconcile`, so any order of the same events ends the
same way. The worker converges the actual state (`Instance.status`) to it.

    pending ──paid──▶ running ◀──paid again──▶ suspended   (past_due after grace,
                         │                        │          unpaid, paused)
                         └──subscription ended────┴──▶ cancelled ──DELETE_AFTER_DAYS──▶ destroyed
"""

from __future__ import annotations

from datetime import datetime, timedelta

from provisioner import alerts, jobs, store_plans
from provisioner.config import Config
from provisioner.models import Instance, LogEntry, Notification, utcnow
from provisioner.states import CONVERGED, JobKind, StoreState, transition

PENDING = StoreState.PENDING
RUNNING = StoreState.RUNNING
SUSPENDED = StoreState.SUSPENDED
CANCELLED = StoreState.CANCELLED
DESTROYED = StoreState.DESTROYED
ATTENTION = StoreState.NEEDS_ATTENTION
STOPPED = frozenset({SUSPENDED, CANCELLED})
# Stripe subscription statuses after which nothing will be billed again.
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})


def desired_state(instance: Instance, config: Config, now: datetime | None = None) -> str:
    """The state billing entitles this store to, from the facts alone."""
    if instance.status in (ATTENTION, DESTROYED):
        return instance.status
    subscription = instance.subscription
    if subscription is None:
        return PENDING
    status = subscription.status
    if status in ENDED_STATUSES:
        return CANCELLED
    if status in ("unpaid", "paused"):
        return SUSPENDED
    if status == "past_due":
        since = subscription.past_due_since or subscription.status_at or utcnow()
        grace_over = (now or utcnow()) >= since + timedelta(days=config.suspend_after_days)
        return SUSPENDED if grace_over else RUNNING
    if status in ("active", "trialing"):
        return RUNNING
    # No status yet (or "incomplete"): only a confirmed payment starts a store.
    return RUNNING if subscription.payment_confirmed and status != "incomplete" else PENDING


def grace_ends(instance: Instance, config: Config) -> datetime | None:
    subscription = instance.subscription
    if subscription is None or subscription.status != "past_due":
        return None
    since = subscription.past_due_since or subscription.status_at or utcnow()
    return since + timedelta(days=config.suspend_after_days)


def reconcile(instance: Instance, config: Config) -> None:
    """Record the desired state and queue the work that converges to it (needs a db_session)."""
    desired = desired_state(instance, config)
    if desired != instance.desired_state:
        LogEntry(instance=instance, message=f"desired state {instance.desired_state} -> {desired}")
        instance.desired_state = desired
        instance.updated_at = utcnow()
    if desired == CANCELLED and instance.delete_after is None:
        ended = (instance.subscription.canceled_at if instance.subscription else None) or utcnow()
        instance.delete_after = ended + timedelta(days=config.delete_after_days)
    elif desired != CANCELLED:
        instance.delete_after = None
    if desired in CONVERGED and (instance.status != desired or store_plans.change_pending(
            config, instance)) and not (desired == RUNNING and instance.admin_hold):
        jobs.enqueue(JobKind.CONVERGE, instance=instance)
    elif desired == RUNNING and instance.welcome_sent_at is None:
        notify(instance, "welcome")
    ends = grace_ends(instance, config)
    if ends is not None and desired == RUNNING:
        notify(instance, "payment_warning", key=_key(instance.subscription.past_due_since))
        # Look again when the grace period is over.
        jobs.enqueue(JobKind.RECONCILE, instance=instance, delay=max(ends - utcnow(), timedelta(0)))


def _key(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "-"


def notify(instance: Instance, notice: str, key: str = "-", text: str = "") -> None:
    """Queue an email unless this one (notice, key) already went out; `text` is what
    the email says beyond the store's facts (a dispute's amount, an invoice's link)."""
    if Notification.get(instance=instance, notice=notice, key=key) is None:
        detail = f"{notice}|{key}" + (f"|{text}" if text else "")
        jobs.enqueue(JobKind.NOTIFY, instance=instance, detail=detail[:1000])


def converged(instance: Instance, state: str) -> None:
    """The worker brought the store to `state`: record it and queue what follows."""
    previous = instance.status
    now = utcnow()
    if state in STOPPED and previous not in STOPPED:
        instance.stopped_since = now
    transition(instance, state)
    if state == RUNNING:
        instance.provisioned_at = instance.provisioned_at or now
        alerts.resolve("provision_failed", instance)
        if instance.welcome_sent_at is None:
            notify(instance, "welcome")
        elif previous in STOPPED:
            notify(instance, "restored", key=_key(instance.stopped_since))
            instance.stopped_since = None
    elif state == SUSPENDED:
        notify(instance, "suspended", key=_key(instance.stopped_since))
    elif state == CANCELLED:
        notify(instance, "closed", key=_key(instance.stopped_since))


def needs_attention(instance: Instance, reason: str) -> None:
    """Park a store for an admin: it holds no name or port and nothing runs."""
    instance.live = False
    transition(instance, ATTENTION, reason)
    instance.desired_state = ATTENTION
    LogEntry(instance=instance, level="error", message=f"needs attention: {reason}")
    notify(instance, "admin_attention")


def due_for_deletion(now: datetime | None = None) -> list[Instance]:
    """Cancelled stores whose grace before deletion is over (needs a db_session)."""
    moment = now or utcnow()
    return list(Instance.select(
        lambda i: i.live and i.desired_state == CANCELLED and i.delete_after is not None
        and i.delete_after <= moment))


def schedule_deletions(now: datetime | None = None) -> list[int]:
    """Queue archive-then-destroy for every store past its deletion date (needs a db_session)."""
    due = due_for_deletion(now)
    for instance in due:
        jobs.enqueue(JobKind.DESTROY, instance=instance)
    return [instance.id for instance in due]


def acted(instance: Instance, action: str, by: str = "an admin") -> None:
    """An admin action went through (or a sysadmin's playbook run did it); stop and
    suspend hold the store against billing."""
    instance.admin_hold = action in ("stop", "suspend")
    status = {"stop": StoreState.STOPPED, "suspend": SUSPENDED}.get(action, RUNNING)
    if status == SUSPENDED and instance.stopped_since is None:
        instance.stopped_since = utcnow()
    transition(instance, status, f"{action} by {by}")
    LogEntry(instance=instance, message=f"{action} by {by} done")


def destroyed(instance: Instance, archive: str | None) -> None:
    """Container, vhost and data are gone (the data archived first): name and port are free."""
    instance.live = False
    instance.archive_path = archive
    instance.destroyed_at = utcnow()
    instance.desired_state = DESTROYED
    transition(instance, DESTROYED, f"archived to {archive}" if archive else None)
    LogEntry(instance=instance, message=f"destroyed; data archived to {archive}")


class RetryRefused(Exception):
    """The store cannot be retried as it stands; the message says why."""


RETRYABLE = frozenset({StoreState.FAILED, StoreState.OUT_OF_STEP, ATTENTION,
                       StoreState.PROVISIONING})


def retry(instance: Instance, config: Config, by: str) -> None:
    """Try again what failed (needs a db_session): a fresh converge towards what billing
    says, re-applying everything a crash may have left half-done. A store parked for an
    admin takes its name and port back first, if nobody else took them meanwhile."""
    if instance.status not in RETRYABLE:
        raise RetryRefused(f"store {instance.subdomain} is {instance.status}; only failed, "
                           f"out-of-step or needs-attention stores are retried")
    if instance.status == ATTENTION:
        taken = Instance.select(lambda i: i.live and i.id != instance.id and (
            i.subdomain == instance.subdomain or (
                i.docker_host == instance.docker_host and i.port == instance.port))).first()
        if taken is not None:
            raise RetryRefused(f"store {taken.subdomain} now holds this store's name or port")
        instance.live = True
    transition(instance, StoreState.FAILED, f"retry requested by {by}")
    instance.desired_state = desired_state(instance, config)
    for waiting in instance.jobs.select(lambda j: j.state == "queued" and j.kind == "converge"):
        waiting.next_run_at = utcnow()
    LogEntry(instance=instance, message=f"retry requested by {by}")
    reconcile(instance, config)


def failed(instance: Instance, error: str, retrying: bool) -> None:
    """A job for this store failed: visible on it, as failed once retries are over."""
    if retrying:
        instance.status_message = f"retrying: {error}"
        instance.updated_at = utcnow()
    else:
        transition(instance, StoreState.FAILED, error)
