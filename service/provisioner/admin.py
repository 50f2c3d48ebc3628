"""What admins see and steer: plain functions over the DB and Docker, used by the
JSON API and the admin pages alike (routes only translate HTTP)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

from pony.orm import count, desc, flush, select

from provisioner import jobs
from provisioner.config import Config
from provisioner.models import (
    AnsibleRun,
    Customer,
    HealthCheck,
    Instance,
    Job,
    LogEntry,
    StripeEvent,
    Subscription,
    utcnow,
)
from provisioner.redaction import redact
from provisioner.states import JobKind, JobState, StoreState

PAYING = ("active", "trialing", "past_due")
# Plain strings for Pony queries.
_FAILED = JobState.FAILED.value
_WAITING = (JobState.QUEUED.value, JobState.RUNNING.value)
_RUNNING = StoreState.RUNNING.value
_NEEDING_AN_ADMIN = (StoreState.FAILED.value, StoreState.NEEDS_ATTENTION.value)


class NotFound(LookupError):
    pass


class Conflict(Exception):
    pass


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def instance_summary(config: Config, instance: Instance) -> dict:
    """Everything an admin may know about a store; never its secrets."""
    subscription = instance.subscription
    return {
        "id": instance.id,
        "subdomain": instance.subdomain,
        "site_name": instance.site_name,
        "url": config.store_url(instance.subdomain),
        "admin_url": config.store_url(instance.subdomain) + "admin/",
        "admin_email": instance.admin_email,
        "status": instance.status,
        "desired_state": instance.desired_state,
        "status_message": instance.status_message,
        "live": instance.live,
        "admin_hold": instance.admin_hold,
        "port": instance.port,
        "docker_host": instance.docker_host,
        "container": instance.container_name,
        "customer_id": instance.customer.id if instance.customer else None,
        "subscription": {
            "stripe_id": subscription.stripe_id,
            "status": subscription.status,
            "current_period_end": _iso(subscription.current_period_end),
        } if subscription else None,
        "welcome_sent_at": _iso(instance.welcome_sent_at),
        "provisioned_at": _iso(instance.provisioned_at),
        "delete_after": _iso(instance.delete_after),
        "archive_path": instance.archive_path,
        "created_at": _iso(instance.created_at),
        "updated_at": _iso(instance.updated_at),
    }


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


def dashboard(config: Config) -> dict:
    """The admin dashboard: counts, failing stores, recent signups, the job queue."""
    failing = Instance.select(lambda i: i.status in _NEEDING_AN_ADMIN
                              ).order_by(desc(Instance.id)).limit(20)
    recent = Instance.select().order_by(desc(Instance.id)).limit(10)
    queue = Job.select(lambda j: j.state in _WAITING).order_by(Job.id).limit(50)
    return {"stats": stats(config),
            "failing": [instance_summary(config, i) for i in failing],
            "recent": [instance_summary(config, i) for i in recent],
            "queue": [job_summary(j) for j in queue]}


def list_instances(config: Config, status: str | None = None, q: str | None = None,
                   page: int = 1, per_page: int = 50) -> dict:
    query = Instance.select()
    if status:
        query = query.filter(lambda i: i.status == status)
    if q:
        needle = q.strip().lower()
        query = query.filter(lambda i: needle in i.subdomain.lower()
                             or needle in i.admin_email.lower())
    total = query.count()
    rows = query.order_by(desc(Instance.id)).page(page, per_page)
    return {"total": total, "page": page, "per_page": per_page,
            "items": [instance_summary(config, i) for i in rows]}


def get_instance(instance_id: int) -> Instance:
    instance = Instance.get(id=instance_id)
    if instance is None:
        raise NotFound(f"no instance {instance_id}")
    return instance


def instance_detail(config: Config, instance_id: int) -> dict:
    instance = get_instance(instance_id)
    recent_jobs = instance.jobs.select().order_by(desc(Job.id)).limit(20)
    recent_logs = instance.logs.select().order_by(desc(LogEntry.id)).limit(100)
    checks = instance.health_checks.select().order_by(desc(HealthCheck.id)).limit(20)
    return {**instance_summary(config, instance),
            "jobs": [job_summary(j) for j in recent_jobs],
            "health_history": [{"at": _iso(h.at), "ok": h.ok, "detail": h.detail,
                                "action": h.action} for h in checks],
            "log": [log_summary(e) for e in recent_logs]}


def list_runs(limit: int = 100) -> list[dict]:
    return [{"id": r.id, "playbook": r.playbook, "status": r.status, "rc": r.rc,
             "started_at": _iso(r.started_at), "finished_at": _iso(r.finished_at),
             "stores": sorted({j.instance.subdomain for j in r.jobs if j.instance})}
            for r in AnsibleRun.select().order_by(desc(AnsibleRun.id)).limit(limit)]


def queue_action(instance_id: int, action: str) -> Job:
    """Queue an admin start/stop/restart; Conflict when the store cannot take it."""
    instance = get_instance(instance_id)
    if not instance.live or instance.provisioned_at is None:
        raise Conflict(f"store {instance.subdomain} has no container to {action}")
    if action in ("start", "restart", "unsuspend") and \
            instance.desired_state != StoreState.RUNNING:
        raise Conflict(f"billing says {instance.desired_state}: it cannot be {action}ed")
    LogEntry(instance=instance, message=f"admin queued {action}")
    job = jobs.enqueue(JobKind.ACTION, instance=instance, detail=action)
    flush()
    return job


def list_customers(page: int = 1, per_page: int = 50) -> dict:
    query = Customer.select().order_by(desc(Customer.id))
    return {"total": query.count(), "page": page, "per_page": per_page, "items": [{
        "id": c.id, "stripe_id": c.stripe_id, "email": c.email, "created_at": _iso(c.created_at),
        "subscriptions": [{"stripe_id": s.stripe_id, "status": s.status,
                           "current_period_end": _iso(s.current_period_end)}
                          for s in c.subscriptions.order_by(Subscription.id)],
        "instances": [{"id": i.id, "subdomain": i.subdomain, "status": i.status}
                      for i in c.instances.order_by(Instance.id)],
    } for c in query.page(page, per_page)]}


def stats(config: Config, days: int = 30) -> dict:
    since = utcnow() - timedelta(days=days)
    by_status = dict(select((i.status, count(i)) for i in Instance))
    signups = Counter(i.created_at.date().isoformat() for i in
                      Instance.select(lambda i: i.created_at >= since))
    cancellations = Counter(s.canceled_at.date().isoformat() for s in
                            Subscription.select(lambda s: s.canceled_at is not None
                                                and s.canceled_at >= since))
    paying = Subscription.select(lambda s: s.status in PAYING).count()
    return {
        "instances_by_status": by_status,
        "instances_total": sum(by_status.values()),
        "signups_per_day": dict(sorted(signups.items())),
        "cancellations_per_day": dict(sorted(cancellations.items())),
        "jobs_by_state": dict(select((j.state, count(j)) for j in Job)),
        "job_failures": Job.select(lambda j: j.state == _FAILED).count(),
        "events_received": StripeEvent.select().count(),
        "events_failed": StripeEvent.select(lambda e: e.failed_at is not None).count(),
        "paying_subscriptions": paying,
        "past_due_subscriptions": Subscription.select(lambda s: s.status == "past_due").count(),
        "monthly_recurring_revenue_pence": paying * config.plan_price_pence,
    }


def job_detail(job_id: int) -> dict:
    job = Job.get(id=job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return {**job_summary(job),
            "log": [log_summary(e) for e in job.logs.select().order_by(LogEntry.id)]}


# -- provisioning logs from ansible-runner artifacts ------------------------

def run_detail(config: Config, run_id: int) -> dict:
    """An ansible run with its per-task events and stdout, secrets redacted."""
    run = AnsibleRun.get(id=run_id)
    if run is None:
        raise NotFound(f"no ansible run {run_id}")
    secrets = config.secrets() + [i.admin_password for j in run.jobs
                                  if (i := j.instance) and i.admin_password]
    artifact = Path(run.artifact_dir)
    stdout_file = artifact / "stdout"
    stdout = stdout_file.read_text(errors="replace") if stdout_file.is_file() else ""
    tasks = []
    for entry in run.logs.select().order_by(LogEntry.id):
        if entry.task:
            tasks.append({"host": entry.instance.subdomain if entry.instance else None,
                          "task": entry.task, "outcome": entry.outcome,
                          "duration": entry.duration, "at": _iso(entry.at)})
    return {"id": run.id, "ident": run.ident, "playbook": run.playbook, "status": run.status,
            "rc": run.rc, "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
            "stores": sorted({j.instance.subdomain for j in run.jobs if j.instance}),
            "tasks": tasks, "stdout": redact(stdout, secrets)}


def public_status() -> dict:
    """What anyone may know: no names, no emails."""
    last_run = AnsibleRun.select().order_by(desc(AnsibleRun.id)).first()
    last_check = HealthCheck.select().order_by(desc(HealthCheck.id)).first()
    live = Instance.select(lambda i: i.live)
    return {
        "service": "up",
        "queue_depth": Job.select(lambda j: j.state in _WAITING).count(),
        "stores_running": live.filter(lambda i: i.status == _RUNNING).count(),
        "stores_total": live.count(),
        "last_ansible_run": _iso(last_run.finished_at) if last_run else None,
        "last_health_sweep": _iso(last_check.at) if last_check else None,
        "checked_at": _iso(utcnow()),
    }
