"""The maintenance operations: health, sync, nginx, cleanup and upgrade, done
through the playbooks. The CLI and the scheduled jobs call the same functions."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from pony.orm import db_session, desc, flush, select

from provisioner import (
    alerts,
    docker_facts,
    docker_hosts,
    drift,
    jobs,
    lifecycle,
    moves,
    store_plans,
)
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import of_instance, with_target
from provisioner.config import Config
from provisioner.models import (
    AlertIncident,
    AnsibleRun,
    HealthCheck,
    Instance,
    LogEntry,
    WebhookDelivery,
    utcnow,
)
from provisioner.states import CONVERGED, JobKind, StoreState, transition

Progress = Callable[[str], None]


@dataclass
class Report:
    """What a maintenance run did, for the CLI's summary and the job log."""

    name: str
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    failed: bool = False
    # The stores it queued work for (cleanup: the ones due for deletion).
    queued: list[int] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return f"{self.name}: {counts or 'nothing to do'} in {self.seconds:.1f} s"


def _quiet(_: str) -> None:
    pass


def run(config: Config, kind: str, progress: Progress = _quiet) -> Report:
    """One maintenance operation by name (job kinds and CLI commands share these)."""
    if kind == JobKind.HEALTH:
        return health_sweep(config, progress)
    if kind == JobKind.SYNC:
        return sync(config, progress)
    if kind == JobKind.NGINX:
        return regenerate_vhosts(config, progress)
    if kind == JobKind.CLEANUP:
        report = Report("cleanup")
        with db_session:
            report.queued = lifecycle.schedule_deletions()
            report.lines += [f"{Instance[i].subdomain}: archive then destroy queued"
                             for i in report.queued]
        report.counts["due for deletion"] = len(report.queued)
        for part in (remove_orphans(config, progress), rotate_artifacts(config)):
            report.counts.update(part.counts)
            report.lines += part.lines
        return report
    raise ValueError(f"unknown maintenance {kind!r}")


_RUNNING = StoreState.RUNNING.value


def _running_stores() -> list[Instance]:
    """The stores a sweep checks: running, not held, not being moved."""
    away = moves.moving()
    return [i for i in Instance.select(lambda i: i.live and i.status == _RUNNING
                                       and not i.admin_hold).order_by(Instance.id)
            if i.id not in away]


def report_destroyed(report: Report) -> int:
    """After the worker ran a cleanup's destroy jobs: what became of each store; failures."""
    failed = 0
    destroy = JobKind.DESTROY.value
    with db_session:
        for instance_id in report.queued:
            instance = Instance[instance_id]
            if instance.status == StoreState.DESTROYED:
                report.lines.append(f"{instance.subdomain}: archived to "
                                    f"{instance.archive_path}, destroyed")
                continue
            failed += 1
            job = instance.jobs.select(lambda j: j.kind == destroy).order_by(
                lambda j: -j.id).first()
            report.lines.append(f"{instance.subdomain}: NOT destroyed: "
                                f"{job.last_error if job else instance.status}")
    report.counts["destroyed"] = len(report.queued) - failed
    report.failed = report.failed or failed > 0
    return failed


def health_sweep(config: Config, progress: Progress = _quiet) -> Report:
    """Check every running store through nginx; restart a newly unhealthy one once.
    A store the restart did not bring back, or failing HEALTH_ALERT_AFTER checks in a
    row, opens a store_down incident (alerts.py: told once); a healthy check closes
    it. Only the judge's verdict on a store counts: a sweep that broke around it
    changes no store."""
    report = Report("health", counts={"healthy": 0, "unhealthy": 0})
    started = time.perf_counter()
    with db_session:
        _close_stopped_incidents()
        running = _running_stores()
        stores = [of_instance(config, i) for i in running]
        measure = _disk_check_due(config, running)
    if not stores:
        return report
    progress(f"checking {len(stores)} store(s) in one playbook run"
             + (", measuring their data…" if measure else "…"))
    result = operations.run(config, Operation.HEALTH, stores,
                            extra_vars={"health_measure_disk": True} if measure else None)
    to_restart = []
    with db_session:
        over = _record_disk_usage(config, result.disk_usage) if measure else 0
        if over:
            report.counts["over their disk"] = over
        for store in stores:
            instance = Instance[int(store.instance_id)]
            outcome = result.hosts[store.name]
            if outcome.ok:
                instance.health_failures = 0
                _record_healthy(instance)
                alerts.resolve("store_down", instance)
                report.counts["healthy"] = report.counts.get("healthy", 0) + 1
                continue
            if not outcome.judged:
                # The sweep broke before its judge said anything of this store (a bad
                # playbook, a killed run): restarting the whole fleet would not help.
                report.counts["not judged"] = report.counts.get("not judged", 0) + 1
                report.lines.append(f"{store.name}: not judged, left alone: {outcome.error}")
                report.failed = True
                continue
            instance.health_failures += 1
            check = HealthCheck(instance=instance, ok=False, detail=outcome.error)
            flush()
            if instance.health_failures == 1:
                check.action = "restart"
                to_restart.append(store)
            if instance.health_failures >= config.health_alert_after:
                check.action = "alert"
                instance.status_message = (f"unhealthy {instance.health_failures} times in a "
                                           f"row: {outcome.error}")
                # One incident per outage: raised again while open, nothing is resent.
                alerts.raise_alert("store_down", f"store {instance.subdomain}: unhealthy "
                                   f"{instance.health_failures} checks in a row: "
                                   f"{outcome.error}", instance)
            report.counts["unhealthy"] = report.counts.get("unhealthy", 0) + 1
            report.lines.append(f"{store.name}: {outcome.error}"
                                + (f" -> {check.action}" if check.action else ""))
            report.failed = True
    if to_restart:
        progress(f"restarting {len(to_restart)} unhealthy store(s)…")
        restarted = operations.run(config, Operation.RESTART, to_restart)
        with db_session:
            for store in to_restart:
                outcome = restarted.hosts[store.name]
                instance = Instance[int(store.instance_id)]
                if outcome.ok:
                    # The restart waited for /health/: the streak of failures is over.
                    instance.health_failures = 0
                    alerts.resolve("store_down", instance)
                else:
                    alerts.raise_alert("store_down", f"store {instance.subdomain}: down, and "
                                       "the restart after its failed check did not bring "
                                       f"it back: {outcome.error or 'failed'}", instance)
                LogEntry(instance=int(store.instance_id),
                         level="info" if outcome.ok else "error",
                         message="health: restarted after a failed check: "
                                 + ("ok" if outcome.ok else outcome.error or "failed"))
        report.counts["restarted"] = len(to_restart)
    report.seconds = time.perf_counter() - started
    return report


def _disk_check_due(config: Config, running: list[Instance]) -> bool:
    """The data dirs are measured every DISK_CHECK_MINUTES, not every sweep: `du` walks
    every file of every store."""
    oldest = min((i.disk_measured_at for i in running if i.disk_measured_at), default=None)
    unmeasured = any(i.disk_measured_at is None for i in running)
    return unmeasured or oldest is None or \
        utcnow() - oldest >= timedelta(minutes=config.disk_check_minutes)


def _record_disk_usage(config: Config, usage: dict[str, float]) -> int:
    """Each measured store's data size. At ALERT_DISK_PERCENT of its plan's disk a
    disk_full incident opens (Docker cannot hold a bind-mounted dir to the plan), so
    the admin hears before the store is over; below, it closes. How many are over."""
    now = utcnow()
    over = 0
    for name, mib in usage.items():
        instance = Instance.get(subdomain=name, live=True)
        if instance is None:
            continue
        instance.disk_used_mb, instance.disk_measured_at = mib, now
        plan = store_plans.current(config, instance)
        limit = plan.disk_mb if plan is not None else 0
        if limit and mib >= limit * config.alert_disk_percent / 100:
            alerts.raise_alert("disk_full", f"store {name}: data takes {mib:g} MiB, "
                               f"{mib / limit:.0%} of the plan's {limit} MiB (alert at "
                               f"{config.alert_disk_percent}%)", instance)
        else:
            alerts.resolve("disk_full", instance)
        if limit and mib > limit:
            over += 1
            if instance.disk_over_since is None:
                instance.disk_over_since = now
                LogEntry(instance=instance, level="warning",
                         message=f"data takes {mib:g} MiB, more than the plan's {limit} MiB")
        elif instance.disk_over_since is not None:
            instance.disk_over_since = None
            LogEntry(instance=instance, message=f"data back within the plan's disk ({mib:g} MiB)")
    return over


# A store stopped on purpose (billing, its end) is not down: its incidents close.
_STOPPED_ON_PURPOSE = (StoreState.SUSPENDED.value, StoreState.CANCELLED.value,
                       StoreState.DESTROYED.value)


def _close_stopped_incidents() -> None:
    """store_down and disk_full of stores no longer meant to run, which no sweep checks
    again: resolved, not left open for ever."""
    for incident in AlertIncident.select(lambda a: a.resolved_at is None
                                         and a.kind in ("store_down", "disk_full")
                                         and a.instance is not None):
        instance = incident.instance
        if not instance.live or instance.status in _STOPPED_ON_PURPOSE:
            alerts.resolve(incident.kind, instance)


def _record_healthy(instance: Instance) -> None:
    """A healthy check: one row per store per hour of health (its `at` moves to the
    latest check), a new one after a failure or in a new hour. A 5-minute sweep
    keeps at most 24 rows a day per healthy store, not 288."""
    now = utcnow()
    last = instance.health_checks.select().order_by(desc(HealthCheck.id)).first()
    if (last is not None and last.ok and last.action is None
            and last.at.replace(minute=0, second=0, microsecond=0)
            == now.replace(minute=0, second=0, microsecond=0)):
        last.at = now
        return
    HealthCheck(instance=instance, ok=True, detail="healthy", at=now)


def sync(config: Config, progress: Progress = _quiet, check: bool = False) -> Report:
    """Compare Docker and nginx with the DB (drift.find); queue a converge of each store
    that differs (container missing, stopped or running against its state, another
    image, vhost missing or for another state) or failed earlier; report containers and
    vhosts of ours nobody owns. `check`: report only, change nothing."""
    report = Report("sync --check" if check else "sync")
    started = time.perf_counter()
    found = drift.find(config, progress)
    report.counts["in step"] = len(found.stores) - len(found.drifted)
    if check:
        report.lines = drift.report_lines(found)
        report.counts["drifted"] = len(found.drifted)
        report.counts["unknown"] = len(found.unknown_containers) + len(found.extra_vhosts)
        report.seconds = time.perf_counter() - started
        return report
    with db_session:
        away = moves.moving()
        for store in found.drifted:
            instance = Instance[store.instance_id]
            problem = "; ".join(store.problems)
            if instance.id in away:
                report.lines.append(f"{instance.subdomain}: {problem} (being moved: left alone)")
                continue
            if instance.admin_hold or instance.desired_state not in CONVERGED:
                report.lines.append(f"{instance.subdomain}: {problem} (held: left alone)")
                continue
            should_run = instance.desired_state == StoreState.RUNNING
            transition(instance, StoreState.PROVISIONING if should_run
                       else StoreState.OUT_OF_STEP, f"sync: {problem}")
            LogEntry(instance=instance, level="warning", message=f"sync: {problem}; converging")
            jobs.enqueue(JobKind.CONVERGE, instance=instance)
            report.lines.append(f"{instance.subdomain}: {problem} -> converge queued")
            report.counts["corrected"] = report.counts.get("corrected", 0) + 1
    report.lines += drift.report_lines(found, stores=False)
    report.counts["unknown"] = len(found.unknown_containers) + len(found.extra_vhosts)
    report.seconds = time.perf_counter() - started
    return report


def regenerate_vhosts(config: Config, progress: Progress = _quiet) -> Report:
    """Every live store's vhost for its state, one nginx -t and reload per host."""
    report = Report("nginx")
    started = time.perf_counter()
    with db_session:
        # A store being moved: its vhost is the move's to switch (kept, not pruned).
        away = moves.moving()
        stores = [with_target(config, i) for i in Instance.select(
            lambda i: i.live and i.provisioned_at is not None).order_by(Instance.id)
            if i.id not in away]
        # A store in its first provisioning has no vhost to render yet, nor to lose.
        keep = list(select(i.subdomain for i in Instance if i.live))
    if stores:
        progress(f"rendering {len(stores)} vhost(s) in one playbook run…")
        result = operations.run(config, Operation.NGINX, stores,
                                extra_vars={"nginx_site_prune_keep": keep})
        report.counts["vhosts"] = len(stores)
        report.counts["changed"] = sum(1 for h in result.hosts.values() if h.changed)
        if result.status != "successful":
            report.failed = True
            report.lines.append(f"nginx {result.status}: "
                                + "; ".join(h.error or "" for h in result.hosts.values()
                                            if not h.ok) or f"rc {result.rc}")
    report.seconds = time.perf_counter() - started
    return report


def remove_orphans(config: Config, progress: Progress = _quiet) -> Report:
    """Remove stopped containers labelled as ours that the DB does not know."""
    report = Report("orphans")
    with db_session:
        known = {(i.docker_host, i.container_name) for i in Instance.select(lambda i: i.live)}
        # A store being moved has a container on its new host the DB does not name yet.
        away = {Instance[i].container_name for i in moves.moving()}
    for host in docker_hosts.load_hosts(config):
        for name, info in docker_facts.containers_on(config, host).items():
            if (host.name, name) in known or info["state"] == "running" or name in away:
                continue
            docker_facts.remove_container(host, name)
            report.lines.append(f"removed stopped orphan {name} on {host.name}")
            report.counts["removed"] = report.counts.get("removed", 0) + 1
    return report


def rotate_artifacts(config: Config) -> Report:
    """Drop ansible run dirs and log entries older than ARTIFACT_RETENTION_DAYS, and
    health history (the uptime figures) older than HEALTH_HISTORY_DAYS."""
    report = Report("rotation")
    cutoff = utcnow() - timedelta(days=config.artifact_retention_days)
    history_cutoff = utcnow() - timedelta(days=config.health_history_days)
    with db_session:
        for run in AnsibleRun.select(lambda r: r.started_at < cutoff):
            run_dir = config.ansible_runs_dir / run.ident
            if run_dir.is_dir():
                shutil.rmtree(run_dir)
                report.counts["run dirs"] = report.counts.get("run dirs", 0) + 1
        for label, old in (("log entries", LogEntry.select(lambda e: e.at < cutoff)),
                           ("health checks", HealthCheck.select(lambda h: h.at < history_cutoff)),
                           ("webhook deliveries",
                            WebhookDelivery.select(lambda d: d.at < cutoff))):
            count = old.count()
            old.delete(bulk=True)
            if count:
                report.counts[label] = count
    return report


def upgrade(config: Config, image: str, batch: int, progress: Progress = _quiet) -> Report:
    """Roll `image` over the running stores, `batch` at a time, each batch healthy
    (the role waits for /health/, then the check through nginx) before the next.
    A store that fails goes back to its previous image and the rollout stops."""
    report = Report("upgrade")
    started = time.perf_counter()
    with db_session:
        targets = [(i.id, i.image or config.ebuilder_image) for i in _running_stores()
                   if (i.image or config.ebuilder_image) != image]
    report.counts["to upgrade"] = len(targets)
    for first in range(0, len(targets), batch):
        chunk = targets[first:first + batch]
        with db_session:
            stores = [of_instance(config, Instance[i]).with_(image=image) for i, _ in chunk]
        progress(f"batch {first // batch + 1}: {', '.join(s.name for s in stores)} -> {image}")
        result = operations.run(config, Operation.PROVISION, stores)
        failed = []
        with db_session:
            for (instance_id, previous), store in zip(chunk, stores, strict=True):
                instance = Instance[instance_id]
                outcome = result.hosts[store.name]
                if outcome.ok:
                    instance.image = image
                    LogEntry(instance=instance, message=f"upgraded {previous} -> {image}")
                    report.counts["upgraded"] = report.counts.get("upgraded", 0) + 1
                else:
                    failed.append(store.with_(image=previous))
                    LogEntry(instance=instance, level="error",
                             message=f"upgrade to {image} failed: {outcome.error}; rolling back")
                    report.lines.append(f"{store.name}: {image} failed ({outcome.error})")
        if failed:
            progress(f"rolling back {len(failed)} store(s) and stopping the rollout…")
            back = operations.run(config, Operation.PROVISION, failed)
            with db_session:
                for store in failed:
                    ok = back.hosts[store.name].ok
                    instance = Instance[int(store.instance_id)]
                    instance.image = store.image if store.image != config.ebuilder_image \
                        else None
                    if not ok:
                        transition(instance, StoreState.FAILED, f"rollback to {store.image} failed")
                    report.lines.append(f"{store.name}: rolled back to {store.image}"
                                        + ("" if ok else " (FAILED)"))
            report.counts["rolled back"] = len(failed)
            report.counts["not attempted"] = len(targets) - first - len(chunk)
            report.failed = True
            break
    report.seconds = time.perf_counter() - started
    return report
