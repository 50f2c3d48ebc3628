"""What admins see and steer: plain functions over the DB and Docker, used by the
JSON API and the admin pages alike (routes only translate HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pony.orm import commit, count, desc, flush, select
from pony.orm import max as pony_max

from provisioner import (
    alerts,
    backups,
    docker_hosts,
    domains,
    events,
    jobs,
    lifecycle,
    moves,
    plans,
    revenue,
    store_plans,
    uptime,
)
from provisioner.config import Config
from provisioner.models import (
    AlertIncident,
    AnsibleRun,
    AuditEntry,
    Customer,
    HealthCheck,
    Instance,
    Job,
    LogEntry,
    StripeEvent,
    Subscription,
    WebhookDelivery,
    utcnow,
)
from provisioner.redaction import redact
from provisioner.states import JobKind, JobState, StoreState

# Plain strings for Pony queries.
_FAILED = JobState.FAILED.value
_QUEUED = JobState.QUEUED.value
_WAITING = (JobState.QUEUED.value, JobState.RUNNING.value)
_RUNNING = StoreState.RUNNING.value
_NEEDING_AN_ADMIN = (StoreState.FAILED.value, StoreState.NEEDS_ATTENTION.value)
# Stores an admin repairs with Retry (a fresh converge), not with Start or Restart.
RETRY_STATES = (StoreState.FAILED.value, StoreState.OUT_OF_STEP.value,
                StoreState.NEEDS_ATTENTION.value)
WEBHOOK_OUTCOMES = ("accepted", "duplicate", "rejected", "busy")
# Pony's int keys are 32-bit: a larger id names nothing (and Pony would raise on it).
_MAX_ID = 2**31 - 1


class NotFound(LookupError):
    pass


class Conflict(Exception):
    pass


@dataclass(frozen=True)
class Actor:
    """Who asks for an admin action, for the audit log: the admin user of Basic auth,
    "token" for the bearer token, "cli:<unix user>"; and the client address, if any."""

    name: str
    address: str | None = None


def audit(by: Actor, action: str, target: str, detail: str | None = None) -> AuditEntry:
    """Record an admin action (needs a db_session): written with the action itself."""
    return AuditEntry(actor=by.name[:200], action=action, target=target,
                      detail=detail[:1000] if detail else None, address=by.address)


def _refused(by: Actor, action: str, target: str, reason: str) -> Conflict:
    """A refused action is audited too (who tried what); committed now, because the
    caller's transaction ends with the Conflict this returns for raising."""
    audit(by, action, target, f"refused: {reason}")
    commit()
    return Conflict(reason)


def _instance_target(instance: Instance) -> str:
    return f"instance:{instance.id}"


def _event_target(event: StripeEvent) -> str:
    return f"event:{event.id}"


def _valid_id(value: int) -> bool:
    return 0 < value <= _MAX_ID


def _skip_page(total: int, page: int, per_page: int) -> bool:
    """A page past the end is empty: no query (nor an offset beyond SQLite's integers)."""
    return (page - 1) * per_page >= total


def _paged(total: int, page: int, per_page: int, items: list) -> dict:
    """One page of a listing: its items, the total, how many pages, the next page's
    number (None on the last)."""
    pages = max(1, -(-total // per_page))
    return {"total": total, "page": page, "per_page": per_page, "pages": pages,
            "next": page + 1 if page < pages else None, "items": items}


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def instance_summary(config: Config, instance: Instance) -> dict:
    """Everything an admin may know about a store; never its secrets."""
    subscription = instance.subscription
    return _summary(config, instance, instance.customer.id if instance.customer else None,
                    (subscription.stripe_id, subscription.status,
                     subscription.current_period_end) if subscription else None)


def _summary(config: Config, instance, customer_id: int | None,
             subscription: tuple | None) -> dict:
    """instance_summary of an Instance or of a _StoreRow (the same attributes);
    `subscription` is (stripe_id, status, current_period_end) or None."""
    url = config.store_url(instance.subdomain)
    return {
        "id": instance.id,
        "subdomain": instance.subdomain,
        "site_name": instance.site_name,
        "url": url,
        "admin_url": url + "admin/",
        "admin_email": instance.admin_email,
        "status": instance.status,
        "desired_state": instance.desired_state,
        "status_message": instance.status_message,
        "live": instance.live,
        "admin_hold": instance.admin_hold,
        "port": instance.port,
        "docker_host": instance.docker_host,
        "container": instance.container_name,
        "customer_id": customer_id,
        "subscription": {
            "stripe_id": subscription[0],
            "status": subscription[1],
            "current_period_end": _iso(subscription[2]),
        } if subscription else None,
        "welcome_sent_at": _iso(instance.welcome_sent_at),
        "provisioned_at": _iso(instance.provisioned_at),
        "delete_after": _iso(instance.delete_after),
        "archive_path": instance.archive_path,
        "created_at": _iso(instance.created_at),
        "updated_at": _iso(instance.updated_at),
    }


@dataclass(frozen=True)
class _StoreRow:
    """The Instance columns a summary reads, as plain values: lists of stores select
    these rather than entity objects (several times faster for a page of 200)."""

    id: int
    subdomain: str
    site_name: str
    admin_email: str
    status: str
    desired_state: str
    status_message: str | None
    live: bool
    admin_hold: bool
    port: int
    docker_host: str
    customer_id: int | None
    subscription_id: int | None
    welcome_sent_at: datetime | None
    provisioned_at: datetime | None
    delete_after: datetime | None
    archive_path: str | None
    created_at: datetime
    updated_at: datetime
    container_name = Instance.container_name  # the entity's own property, not a copy


def instance_summaries(config: Config, instances, page: int = 1,
                       per_page: int = 50) -> list[dict]:
    """instance_summary for one page of an Instance query, newest first (by id, a stable
    order): two queries (the stores' columns, their subscriptions), no entity objects."""
    rows = [_StoreRow(*row) for row in select(
        (i.id, i.subdomain, i.site_name, i.admin_email, i.status, i.desired_state,
         i.status_message, i.live, i.admin_hold, i.port, i.docker_host, i.customer.id,
         i.subscription.id, i.welcome_sent_at, i.provisioned_at, i.delete_after,
         i.archive_path, i.created_at, i.updated_at) for i in instances
    ).order_by(-1).page(page, per_page)]
    wanted = sorted({row.subscription_id for row in rows if row.subscription_id})
    subscriptions = {number: (stripe_id, status, period_end)
                     for number, stripe_id, status, period_end in select(
                         (s.id, s.stripe_id, s.status, s.current_period_end)
                         for s in Subscription if s.id in wanted)} if wanted else {}
    return [_summary(config, row, row.customer_id, subscriptions.get(row.subscription_id))
            for row in rows]


def job_summary(job: Job) -> dict:
    return {
        "id": job.id, "kind": job.kind, "detail": job.detail, "state": job.state,
        "attempts": job.attempts, "instance_id": job.instance.id if job.instance else None,
        "next_run_at": _iso(job.next_run_at), "last_error": job.last_error,
        "ansible_run": job.ansible_run.id if job.ansible_run else None,
        "created_at": _iso(job.created_at), "finished_at": _iso(job.finished_at),
    }


def log_summary(entry: LogEntry) -> dict:
    return {
        "at": _iso(entry.at), "level": entry.level, "message": entry.message,
        "task": entry.task, "outcome": entry.outcome, "duration": entry.duration,
        "job_id": entry.job.id if entry.job else None,
        "ansible_run": entry.ansible_run.id if entry.ansible_run else None,
    }


DASHBOARD_FAILING = 20
DASHBOARD_RECENT = 10
DASHBOARD_QUEUE = 50


def dashboard(config: Config) -> dict:
    """The admin dashboard: counts, the few stores needing a look, recent signups, the job
    queue. A fixed number of queries and rows, however many stores there are."""
    needing = Instance.select(lambda i: i.status in _NEEDING_AN_ADMIN)
    waiting = Job.select(lambda j: j.state in _WAITING)
    queue = waiting.order_by(Job.id).prefetch(Job.last_error).limit(DASHBOARD_QUEUE)
    return {"stats": stats(config),
            "failing": instance_summaries(config, needing, per_page=DASHBOARD_FAILING),
            "failing_total": needing.count(),
            "recent": instance_summaries(config, Instance.select(), per_page=DASHBOARD_RECENT),
            "queue": [job_summary(j) for j in queue],
            "queue_total": waiting.count(),
            "alerts": alerts.open_incidents(limit=DASHBOARD_FAILING, deliveries=False),
            "alerts_total": AlertIncident.select(lambda a: a.resolved_at is None).count(),
            "hosts": docker_hosts.capacity(config),
            "alert_deliveries_failed": alerts.deliveries_failed()}


def _instances_matching(status: str | None, q: str | None):
    query = Instance.select()
    if status:
        query = query.filter(lambda i: i.status == status)
    needle = (q or "").strip().lower()
    if needle:
        query = query.filter(lambda i: needle in i.subdomain.lower()
                             or needle in i.admin_email.lower()
                             or needle in i.site_name.lower())
    return query


def list_instances(config: Config, status: str | None = None, q: str | None = None,
                   page: int = 1, per_page: int = 50) -> dict:
    """Stores newest first (by id: a stable order), one page of them; `status` is one
    state exactly, `q` searches subdomain, email and site name (case-insensitive,
    literally). Three queries (a count, the page's stores, their subscriptions),
    however many stores there are."""
    query = _instances_matching(status, q)
    total = query.count()
    items = [] if _skip_page(total, page, per_page) else \
        instance_summaries(config, query, page, per_page)
    return _paged(total, page, per_page, items)


def get_instance(instance_id: int) -> Instance:
    instance = Instance.get(id=instance_id) if _valid_id(instance_id) else None
    if instance is None:
        raise NotFound(f"no instance {instance_id}")
    return instance


def instance_detail(config: Config, instance_id: int) -> dict:
    instance = get_instance(instance_id)
    recent_jobs = instance.jobs.select().order_by(desc(Job.id)).prefetch(Job.last_error
                                                                         ).limit(20)
    recent_logs = instance.logs.select().order_by(desc(LogEntry.id)
                                                  ).prefetch(LogEntry.message).limit(100)
    checks = instance.health_checks.select().order_by(desc(HealthCheck.id)).limit(20)
    target = _instance_target(instance)
    recent_audit = AuditEntry.select(lambda a: a.target == target
                                     ).order_by(desc(AuditEntry.id)).limit(10)
    return {**instance_summary(config, instance),
            **plan_detail(config, instance),
            "billing_events": billing_events(instance.customer),
            "backups": backups.listing(instance, limit=30),
            "domains": domains.detail(config, instance),
            "uptime": uptime.detail(instance, interval_minutes=config.health_interval_minutes),
            "retryable": instance.status in RETRY_STATES,
            "host": host_detail(config, instance),
            "jobs": [job_summary(j) for j in recent_jobs],
            "health_history": [{"at": _iso(h.at), "ok": h.ok, "detail": h.detail,
                                "action": h.action} for h in checks],
            "log": [log_summary(e) for e in recent_logs],
            "audit": [audit_summary(a) for a in recent_audit]}


BILLING_EVENTS_SHOWN = 30


def host_detail(config: Config, instance: Instance) -> dict:
    """Where the store runs, and the hosts it could move to now (one query)."""
    try:
        rooms = docker_hosts.capacity(config)
    except docker_hosts.NoCapacity as exc:
        return {"address": None, "move_targets": [], "error": str(exc)}
    own = next((r for r in rooms if r["name"] == instance.docker_host), None)
    movable = instance.live and instance.provisioned_at is not None and \
        instance.status in moves.MOVABLE
    edge = docker_hosts.host_of(config, instance.docker_host).edge
    return {"address": own["address"] if own else None, "error": None,
            "move_targets": [r["name"] for r in rooms if movable and r["listed"]
                             and r["free"] > 0 and r["name"] != instance.docker_host
                             and docker_hosts.host_of(config, r["name"]).edge == edge]}


def plan_detail(config: Config, instance: Instance) -> dict:
    """The store's plan and limits, the plan billing asks for, and why it waits."""
    current = store_plans.current(config, instance)
    wanted = store_plans.wanted(config, instance)
    subscription = instance.subscription
    asked = plans.by_price(config, subscription.price_id) if subscription else None
    shown = {**current.as_dict(), "limits_text": current.limits_text()} if current else {
        "name": store_plans.name_of(config, instance), "price_id": instance.plan_price_id,
        "price_text": store_plans.billed_text(config, instance),
        "limits_text": "limits left as they are (its plan is no longer in the plans file)"}
    return {"plan": shown,
            "plan_pending": wanted.as_dict() if wanted and wanted != current else None,
            "plan_refused": asked.as_dict() if asked and instance.plan_refused ==
            asked.price_id and asked != current else None,
            "plan_problem": instance.plan_problem,
            "unknown_price": store_plans.unknown_price(config, instance),
            "disk": {"used_mb": instance.disk_used_mb,
                     "limit_mb": current.disk_mb if current else None,
                     "measured_at": _iso(instance.disk_measured_at),
                     "over_since": _iso(instance.disk_over_since)}}


def billing_events(customer: Customer | None) -> list[dict]:
    """The newest Stripe events about this customer, however they reached us."""
    if customer is None or not customer.stripe_id:
        return []
    stripe_id = customer.stripe_id
    found = StripeEvent.select(lambda e: e.stripe_customer_id == stripe_id
                               ).order_by(desc(StripeEvent.id)).limit(BILLING_EVENTS_SHOWN)
    waiting = _waiting_events([e.id for e in found])
    return [event_summary(e, e.id in waiting) for e in found]


def apply_plan(config: Config, instance_id: int, by: Actor) -> dict:
    """Apply a refused plan change anyway (limits lowered below what the store uses),
    audited; Conflict when no change waits."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    try:
        plan = store_plans.force(config, instance)
    except ValueError as exc:
        raise _refused(by, "apply-plan", target, str(exc)) from None
    flush()
    job = instance.jobs.select(lambda j: j.state == _QUEUED and j.kind == JobKind.CONVERGE
                               ).first()
    audit(by, "apply-plan", target, f"{instance.subdomain}: plan {plan.name} forced")
    return {"instance_id": instance.id, "plan": plan.as_dict(),
            "job_id": job.id if job else None}


def backup_store(instance_id: int, by: Actor) -> dict:
    """Queue a backup of one store, audited; Conflict when it has no data to back up."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    try:
        job = backups.request_backup(instance)
    except backups.Refused as exc:
        raise _refused(by, "backup", target, str(exc)) from None
    flush()
    audit(by, "backup", target, f"{instance.subdomain}: backup queued")
    return {"instance_id": instance.id, "job_id": job.id}


def backup_all(by: Actor) -> dict:
    """Queue a backup of every running store (as the schedule does), audited."""
    job = jobs.enqueue(JobKind.BACKUP, detail="manual")
    flush()
    audit(by, "backup", "instances", "backup of every running store queued")
    return {"job_id": job.id}


def restore_store(instance_id: int, which: str | int | None, by: Actor) -> dict:
    """Queue putting a backup back (the newest good one when `which` is None), audited."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    try:
        backup = backups.find_backup(instance, which)
        job = backups.request_restore(instance, backup)
    except backups.Refused as exc:
        raise _refused(by, "restore", target, str(exc)) from None
    flush()
    audit(by, "restore", target, f"{instance.subdomain}: restore of backup {backup.id} "
                                 f"({backup.created_at:%Y-%m-%d %H:%M:%S} UTC) queued")
    return {"instance_id": instance.id, "job_id": job.id, "backup": backups.summary(backup)}


def clone_store(config: Config, instance_id: int, new_subdomain: str,
                which: str | int | None, by: Actor) -> dict:
    """Queue a clone of a store under a new name (from a backup taken now, or the one
    given), audited on both stores."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    try:
        backup = backups.find_backup(instance, which) if which not in (None, "") else None
        clone, job = backups.request_clone(config, instance, new_subdomain, backup)
    except backups.Refused as exc:
        raise _refused(by, "clone", target, str(exc)) from None
    flush()
    audit(by, "clone", target, f"{instance.subdomain}: cloned into {clone.subdomain} "
                               f"(store {clone.id})")
    audit(by, "clone", _instance_target(clone), f"clone of {instance.subdomain}")
    return {"instance_id": instance.id, "clone_id": clone.id, "subdomain": clone.subdomain,
            "job_id": job.id}


def move_store(config: Config, instance_id: int, docker_host: str, by: Actor) -> dict:
    """Queue moving a store to another Docker host, audited; Conflict when it cannot go
    there (its state, the host unknown, draining or full)."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    try:
        job = moves.request_move(config, instance, docker_host)
    except moves.Refused as exc:
        raise _refused(by, "move", target, str(exc)) from None
    flush()
    audit(by, "move", target, f"{instance.subdomain}: move from {instance.docker_host} to "
                              f"{docker_host} queued")
    return {"instance_id": instance.id, "job_id": job.id, "from": instance.docker_host,
            "to": docker_host}


def list_runs(limit: int = 100) -> list[dict]:
    """The newest runs with the stores each touched: two queries, not one per run (a
    batch can hold every store)."""
    runs = AnsibleRun.select().order_by(desc(AnsibleRun.id)).limit(limit)[:]
    numbers = [r.id for r in runs]
    stores: dict[int, set[str]] = {number: set() for number in numbers}
    if numbers:
        for number, subdomain in select((j.ansible_run.id, j.instance.subdomain) for j in Job
                                        if j.ansible_run.id in numbers
                                        and j.instance is not None):
            stores[number].add(subdomain)
        # A sysadmin's run has no jobs: its stores are those of its log.
        manual = [r.id for r in runs if r.started_by]
        if manual:
            for number, subdomain in select((e.ansible_run.id, e.instance.subdomain)
                                            for e in LogEntry if e.ansible_run.id in manual
                                            and e.instance is not None):
                stores[number].add(subdomain)
    return [{"id": r.id, "playbook": r.playbook, "status": r.status, "rc": r.rc,
             "started_at": _iso(r.started_at), "finished_at": _iso(r.finished_at),
             "started_by": r.started_by, "stores": sorted(stores[r.id])} for r in runs]


def _action_refusal(instance: Instance, action: str) -> str | None:
    """Why the store cannot take this admin action now, or None."""
    starts = action in ("start", "restart", "unsuspend")
    if starts and instance.status in RETRY_STATES:
        # Starting a container cannot repair a half-made store; a retry re-applies it all.
        return (f"store {instance.subdomain} is {instance.status}: {action} cannot repair it; "
                f"use Retry (the Retry button, POST /api/instances/{instance.id}/retry/ or "
                f"`provisioner retry {instance.id}`), which re-applies the whole store")
    if not instance.live or instance.provisioned_at is None:
        return f"store {instance.subdomain} has no container to {action}"
    if starts and instance.desired_state != StoreState.RUNNING:
        return f"billing says {instance.desired_state}: it cannot be {action}ed"
    return None


def queue_action(instance_id: int, action: str, by: Actor) -> Job:
    """Queue an admin start/stop/restart/suspend/unsuspend, audited; Conflict (also
    audited) when the store cannot take it."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    reason = _action_refusal(instance, action)
    if reason is not None:
        raise _refused(by, action, target, reason)
    LogEntry(instance=instance, message=f"admin {by.name} queued {action}")
    job = jobs.enqueue(JobKind.ACTION, instance=instance, detail=action)
    flush()
    audit(by, action, target, f"{instance.subdomain}: job {job.id} queued")
    return job


def find_instance(name_or_id: str) -> Instance:
    """A store by id or subdomain (the live one first, else the newest with that name)."""
    text = name_or_id.strip()
    if text.isascii() and text.isdigit() and len(text) <= 10:
        return get_instance(int(text))
    named = Instance.select(lambda i: i.subdomain == text)
    instance = named.filter(lambda i: i.live).first() or named.order_by(desc(Instance.id)).first()
    if instance is None:
        raise NotFound(f"no store named {text!r}")
    return instance


def retry_store(config: Config, instance_id: int, by: Actor) -> dict:
    """Retry a failed, out-of-step or parked store (lifecycle.retry), audited: the
    store's state after it and the jobs now waiting for it."""
    instance = get_instance(instance_id)
    target = _instance_target(instance)
    try:
        lifecycle.retry(instance, config, by.name)
    except lifecycle.RetryRefused as exc:
        raise _refused(by, "retry", target, str(exc)) from None
    flush()
    waiting = instance.jobs.select(lambda j: j.state == _QUEUED
                                   ).order_by(Job.id)[:]
    converge = next((j for j in waiting if j.kind == JobKind.CONVERGE), None)
    audit(by, "retry", target, f"{instance.subdomain}: " + (
        f"converge job {converge.id} queued towards {instance.desired_state}" if converge
        else f"nothing to run: billing says {instance.desired_state}"))
    return {"instance_id": instance.id, "subdomain": instance.subdomain,
            "status": instance.status, "desired_state": instance.desired_state,
            "job_id": converge.id if converge else None,
            "queued": [job_summary(j) for j in waiting]}


# -- Stripe events and webhook deliveries ------------------------------------

def get_event(event_id: int) -> StripeEvent:
    event = StripeEvent.get(id=event_id) if _valid_id(event_id) else None
    if event is None:
        raise NotFound(f"no event {event_id}")
    return event


def find_event(stripe_id_or_number: str) -> StripeEvent:
    """A recorded event by its Stripe id (evt_...) or its number here."""
    text = stripe_id_or_number.strip()
    if text.isascii() and text.isdigit() and len(text) <= 10:
        return get_event(int(text))
    event = StripeEvent.get(stripe_id=text)
    if event is None:
        raise NotFound(f"no recorded event {text!r}")
    return event


def _event_state(event: StripeEvent, waiting: bool) -> str:
    if waiting:
        return "queued"
    if event.failed_at:
        return "failed"
    if event.processed_at:
        return "processed"
    return "retrying" if event.error else "pending"


def event_summary(event: StripeEvent, waiting: bool) -> dict:
    """A recorded event without its payload (customer details stay in the DB)."""
    return {"id": event.id, "stripe_id": event.stripe_id, "type": event.type,
            "state": _event_state(event, waiting), "received_at": _iso(event.received_at),
            "processed_at": _iso(event.processed_at), "failed_at": _iso(event.failed_at),
            "error": event.error, "duplicates": event.duplicates}


def _waiting_events(event_ids: list[int]) -> set[int]:
    """Which of these events have a job queued or running (one query)."""
    if not event_ids:
        return set()
    return set(select(j.event.id for j in Job
                      if j.event.id in event_ids and j.state in _WAITING))


def event_detail(event_id: int) -> dict:
    event = get_event(event_id)
    waiting = bool(_waiting_events([event.id]))
    deliveries = WebhookDelivery.select(lambda d: d.stripe_id == event.stripe_id
                                        ).order_by(desc(WebhookDelivery.id)).limit(20)
    return {**event_summary(event, waiting),
            "jobs": [job_summary(j) for j in
                     event.jobs.select().order_by(desc(Job.id)).limit(20)],
            "deliveries": [delivery_summary(d) for d in deliveries]}


def replay_event(event_id: int, by: Actor) -> Job:
    """Queue a recorded event to be applied again (events.replay), audited; Conflict
    (also audited) while it is still waiting to be applied."""
    event = get_event(event_id)
    target = _event_target(event)
    waiting = event.jobs.select(lambda j: j.state in _WAITING).first()
    if waiting is not None:
        raise _refused(by, "replay", target, f"event {event.stripe_id} is already "
                       f"{waiting.state} as job {waiting.id}")
    events.replay(event, by.name)
    flush()
    job = event.jobs.select(lambda j: j.state == _QUEUED
                            ).order_by(desc(Job.id)).first()
    audit(by, "replay", target, f"{event.stripe_id} ({event.type}): job {job.id} queued")
    return job


def delivery_summary(delivery: WebhookDelivery) -> dict:
    return {"id": delivery.id, "at": _iso(delivery.at), "outcome": delivery.outcome,
            "stripe_id": delivery.stripe_id, "type": delivery.type,
            "reason": delivery.reason, "address": delivery.address}


def list_webhooks(outcome: str | None = None, q: str | None = None, page: int = 1,
                  per_page: int = 50) -> dict:
    """Webhook deliveries, newest first, one page of them with their recorded events:
    a count and two bounded queries, however many deliveries there are."""
    query = WebhookDelivery.select()
    if outcome:
        query = query.filter(lambda d: d.outcome == outcome)
    if q and q.strip():
        needle = q.strip().lower()
        query = query.filter(lambda d: needle in d.stripe_id.lower() or needle in d.type.lower()
                             or needle in d.reason.lower())
    total = query.count()
    rows = [] if _skip_page(total, page, per_page) else \
        query.order_by(desc(WebhookDelivery.id)).page(page, per_page)[:]
    stripe_ids = sorted({d.stripe_id for d in rows if d.stripe_id})
    # The error is a lazy LongStr: fetched with the rows, not one query per event.
    recorded = {e.stripe_id: e for e in StripeEvent.select(lambda e: e.stripe_id in stripe_ids
                                                           ).prefetch(StripeEvent.error)
                } if stripe_ids else {}
    waiting = _waiting_events([e.id for e in recorded.values()])
    items = []
    for delivery in rows:
        event = recorded.get(delivery.stripe_id)
        items.append({**delivery_summary(delivery),
                      "event": event_summary(event, event.id in waiting) if event else None})
    return _paged(total, page, per_page, items)


# -- the audit log -----------------------------------------------------------

def _target_link(target: str | None) -> str | None:
    kind, _, number = (target or "").partition(":")
    if not number.isdigit():
        return None
    return {"instance": f"/admin/instances/{number}/",
            "event": f"/admin/events/{number}/"}.get(kind)


def audit_summary(entry: AuditEntry) -> dict:
    return {"id": entry.id, "at": _iso(entry.at), "actor": entry.actor,
            "action": entry.action, "target": entry.target, "detail": entry.detail,
            "address": entry.address, "link": _target_link(entry.target)}


def list_audit(q: str | None = None, page: int = 1, per_page: int = 50,
               target: str | None = None) -> dict:
    """The audit log, newest first; `q` searches actor, action, target and detail;
    `target` is one store or event exactly ("instance:7", "event:3")."""
    query = AuditEntry.select()
    if target:
        query = query.filter(lambda a: a.target == target)
    if q and q.strip():
        needle = q.strip().lower()
        query = query.filter(lambda a: needle in a.actor.lower() or needle in a.action.lower()
                             or needle in a.target.lower() or needle in a.detail.lower())
    total = query.count()
    rows = [] if _skip_page(total, page, per_page) else \
        query.order_by(desc(AuditEntry.id)).page(page, per_page)[:]
    return _paged(total, page, per_page, [audit_summary(a) for a in rows])


def list_customers(page: int = 1, per_page: int = 50) -> dict:
    """Customers newest first with their subscriptions and stores: a count and three
    queries for the page (customers, their subscriptions, their stores)."""
    total = Customer.select().count()
    rows = [] if _skip_page(total, page, per_page) else \
        Customer.select().order_by(desc(Customer.id)).prefetch(
            Customer.subscriptions, Customer.instances).page(page, per_page)[:]
    return _paged(total, page, per_page, [{
        "id": c.id, "stripe_id": c.stripe_id, "email": c.email, "created_at": _iso(c.created_at),
        "subscriptions": [{"stripe_id": s.stripe_id, "status": s.status,
                           "current_period_end": _iso(s.current_period_end)}
                          for s in sorted(c.subscriptions, key=lambda s: s.id)],
        "instances": [{"id": i.id, "subdomain": i.subdomain, "status": i.status}
                      for i in sorted(c.instances, key=lambda i: i.id)],
    } for c in rows])


def _per_day(rows) -> dict[str, int]:
    """(day, n) rows of a GROUP BY on a date as {"YYYY-MM-DD": n}, oldest first."""
    return dict(sorted((str(day), n) for day, n in rows if day is not None))


def stats(config: Config, days: int = 30) -> dict:
    """Counts by SQL aggregates (GROUP BY, COUNT): a fixed number of queries and no row
    loaded as an object, however many stores, jobs and events there are."""
    since = utcnow() - timedelta(days=days)
    by_status = dict(select((i.status, count()) for i in Instance))
    signups = _per_day(select((i.created_at.date(), count()) for i in Instance
                              if i.created_at >= since))
    cancellations = _per_day(select((s.canceled_at.date(), count()) for s in Subscription
                                    if s.canceled_at is not None and s.canceled_at >= since))
    money = revenue.figures(config, days)
    return {
        "instances_by_status": by_status,
        "instances_total": sum(by_status.values()),
        "signups_per_day": signups,
        "cancellations_per_day": cancellations,
        "jobs_by_state": dict(select((j.state, count()) for j in Job)),
        "job_failures": Job.select(lambda j: j.state == _FAILED).count(),
        "events_received": StripeEvent.select().count(),
        "events_failed": StripeEvent.select(lambda e: e.failed_at is not None).count(),
        "paying_subscriptions": money["billed_subscriptions"],
        "trialing_subscriptions": money["trialing_subscriptions"],
        "past_due_subscriptions": Subscription.select(lambda s: s.status == "past_due").count(),
        "monthly_recurring_revenue_pence": money["mrr_pence"],
        "revenue": money,
    }


def job_detail(job_id: int) -> dict:
    job = Job.get(id=job_id) if _valid_id(job_id) else None
    if job is None:
        raise NotFound(f"no job {job_id}")
    return {**job_summary(job),
            "log": [log_summary(e) for e in
                    job.logs.select().order_by(LogEntry.id).prefetch(LogEntry.message)]}


# -- provisioning logs from ansible-runner artifacts ------------------------

def run_detail(config: Config, run_id: int) -> dict:
    """An ansible run with its per-task events and stdout, secrets redacted."""
    run = AnsibleRun.get(id=run_id) if _valid_id(run_id) else None
    if run is None:
        raise NotFound(f"no ansible run {run_id}")
    secrets = config.secrets() + [i.admin_password for j in run.jobs
                                  if (i := j.instance) and i.admin_password]
    artifact = Path(run.artifact_dir)
    stdout_file = artifact / "stdout"
    # A sysadmin's run kept no artifacts here (its output stayed on their terminal).
    stdout = stdout_file.read_text(errors="replace") \
        if not run.started_by and stdout_file.is_file() else ""
    tasks = []
    for entry in run.logs.select().order_by(LogEntry.id):
        if entry.task:
            tasks.append({"host": entry.instance.subdomain if entry.instance else None,
                          "task": entry.task, "outcome": entry.outcome,
                          "duration": entry.duration, "at": _iso(entry.at)})
    return {"id": run.id, "ident": run.ident, "playbook": run.playbook, "status": run.status,
            "rc": run.rc, "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
            "stores": sorted({j.instance.subdomain for j in run.jobs if j.instance}
                             | {e.instance.subdomain for e in run.logs if e.instance}),
            "started_by": run.started_by, "tasks": tasks, "stdout": redact(stdout, secrets)}


def public_status() -> dict:
    """What anyone may know: no names, no emails."""
    last_run = AnsibleRun.select().order_by(desc(AnsibleRun.id)).first()
    # A healthy store's row of the hour moves its `at` to the latest check: the newest
    # `at`, not the newest row, is the last sweep.
    last_check = pony_max(h.at for h in HealthCheck)
    live = Instance.select(lambda i: i.live)
    return {
        "service": "up",
        "queue_depth": Job.select(lambda j: j.state in _WAITING).count(),
        "stores_running": live.filter(lambda i: i.status == _RUNNING).count(),
        "stores_total": live.count(),
        "last_ansible_run": _iso(last_run.finished_at) if last_run else None,
        "last_health_sweep": _iso(last_check) if last_check else None,
        "checked_at": _iso(utcnow()),
    }
