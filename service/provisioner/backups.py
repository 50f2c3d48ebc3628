"""Backups of stores' data dirs: made on the store's Docker host (consistent,
checksummed, verified, mirrored to a second location), kept by count and age, put
back in place (restore) or into a new store for support (clone).

Every backup is a Backup row made before its run and finished by the run's result,
so a backup that never finished shows as failed, never as missing."""

from __future__ import annotations

from datetime import datetime, timedelta

from pony.orm import commit, db_session, desc, flush, select

from provisioner import alerts, docker_hosts, jobs, lifecycle, subdomains
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars, of_instance
from provisioner.config import Config
from provisioner.models import Backup, Instance, Job, LogEntry, utcnow
from provisioner.states import JobKind, StoreState

# Stores whose data a backup or a clone is taken from (their data dir exists).
BACKED_UP = frozenset({StoreState.RUNNING, StoreState.STOPPED, StoreState.SUSPENDED,
                       StoreState.CANCELLED, StoreState.OUT_OF_STEP})
# Stores per backup run: each run is recorded as it ends, and a big fleet's data never
# has to fit in one run's timeout (JOB_RUN_TIMEOUT_SECONDS).
RUN_SIZE = 50
# A clone gets its own secret key (made with its container) and its own plan's limits.
CLONE_EXCLUDE = ("secret_key", ".limits")


class Refused(jobs.Final):
    """What was asked cannot be done as the store stands; the message says why."""


class BackupFailed(Exception):
    """A backup run failed for some stores (each recorded and alerted); retried."""


def archive_path(config: Config, instance: Instance, at: datetime) -> str:
    """One dir per store on its Docker host, one archive per moment."""
    root = docker_hosts.backup_root(config, docker_hosts.host_of(config, instance.docker_host))
    return (f"{root}/{instance.subdomain}-{instance.id}/"
            f"{instance.subdomain}-{at:%Y%m%dT%H%M%S}.{at.microsecond:06d}Z.tar.gz")


def summary(backup: Backup) -> dict:
    return {"id": backup.id, "instance_id": backup.instance.id, "path": backup.path,
            "docker_host": backup.docker_host, "reason": backup.reason,
            "status": backup.status, "sha256": backup.sha256,
            "size_bytes": backup.size_bytes, "copy_path": backup.copy_path,
            "error": backup.error,
            "created_at": backup.created_at.isoformat(timespec="seconds") + "Z",
            "finished_at": backup.finished_at.isoformat(timespec="seconds") + "Z"
            if backup.finished_at else None}


def listing(instance: Instance, limit: int = 50) -> list[dict]:
    """The store's backups, newest first, deleted ones left out (needs a db_session)."""
    rows = instance.backups.select(lambda b: b.status != "deleted").order_by(
        desc(Backup.created_at), desc(Backup.id)).prefetch(Backup.error).limit(limit)
    return [summary(b) for b in rows]


def latest_good(instance: Instance) -> Backup | None:
    """The newest good backup on the store's own host (older hosts' archives stay there)."""
    host = instance.docker_host
    return instance.backups.select(lambda b: b.status == "ok" and b.docker_host == host
                                   ).order_by(
        desc(Backup.created_at), desc(Backup.id)).first()


def expired(config: Config, instance: Instance, now: datetime,
            reason: str = "scheduled") -> list[Backup]:
    """What retention drops once a new backup (made for `reason`) is made: the scheduled
    ones beyond the newest BACKUP_KEEP (the new one counted), and any older than
    BACKUP_KEEP_DAYS (the new one is then the newest good one). Manual, clone and other
    backups do not count: clicking Back up seven times never pushes the week's history
    out. Only the archives on the store's own host: the backup run deletes them there
    (a moved store's older archives stay on its old host, listed)."""
    host = instance.docker_host
    good = list(instance.backups.select(lambda b: b.status == "ok" and b.docker_host == host
                                        ).order_by(desc(Backup.created_at), desc(Backup.id)))
    cutoff = now - timedelta(days=config.backup_keep_days)
    scheduled = [b for b in good if b.reason == "scheduled"]
    kept = scheduled[:config.backup_keep - (1 if reason == "scheduled" else 0)]
    return [b for b in good if b.created_at < cutoff
            or (b.reason == "scheduled" and b not in kept)]


# -- requests (admin API, pages, CLI): checked at once, done by the worker ----------

def request_backup(instance: Instance, reason: str = "manual") -> Job:
    """Queue a backup of one store (needs a db_session)."""
    if not instance.live or instance.provisioned_at is None or \
            instance.status not in BACKED_UP:
        raise Refused(f"store {instance.subdomain} is {instance.status}: it has no data "
                      "to back up")
    return jobs.enqueue(JobKind.BACKUP, instance=instance, detail=reason)


def find_backup(instance: Instance, which: str | int | None) -> Backup:
    """A good backup of this store by id or archive path; the newest when None."""
    if which in (None, ""):
        backup = latest_good(instance)
        if backup is None:
            raise Refused(f"store {instance.subdomain} has no good backup")
        return backup
    text = str(which)
    number = text.isascii() and text.isdigit() and len(text) <= 18
    backup = Backup.get(id=int(text)) if number else Backup.get(path=text)
    if backup is None or backup.instance != instance:
        raise Refused(f"store {instance.subdomain} has no backup {text}")
    if backup.status != "ok":
        raise Refused(f"backup {backup.id} is {backup.status}; only a good backup is restored")
    if backup.docker_host != instance.docker_host:
        # Made before the store moved: its archive is on the old host.
        raise Refused(f"backup {backup.id} is on {backup.docker_host} (made before the store "
                      f"moved to {instance.docker_host}); copy it there by hand or back up anew")
    return backup


def request_restore(instance: Instance, backup: Backup) -> Job:
    """Queue putting `backup` back in its store (needs a db_session)."""
    if not instance.live or instance.status != StoreState.RUNNING:
        raise Refused(f"store {instance.subdomain} is {instance.status}; only a running "
                      "store is restored (it is started again on the restored data)")
    return jobs.enqueue(JobKind.RESTORE, instance=instance, detail=str(backup.id))


def request_clone(config: Config, source: Instance, new_subdomain: str,
                  backup: Backup | None = None) -> tuple[Instance, Job]:
    """A new store for support with the source's data (a backup taken now, or the one
    given): same customer and billing (it lives as long as theirs), its own name, port
    and secret key, no welcome email (it has no new password: the source's admin logs
    in). Needs a db_session."""
    if not source.live or source.provisioned_at is None or source.status not in BACKED_UP:
        raise Refused(f"store {source.subdomain} is {source.status}: nothing to clone")
    try:
        name = subdomains.check_available(new_subdomain)
    except subdomains.InvalidSubdomain as exc:
        raise Refused(str(exc)) from None
    clone = Instance(
        subdomain=name, site_name=source.site_name, admin_email=source.admin_email,
        customer=source.customer, subscription=source.subscription,
        plan_price_id=source.plan_price_id, image=source.image,
        # The backup is on the source's host: the clone is made there.
        docker_host=source.docker_host, port=docker_hosts.free_port(config),
        welcome_sent_at=utcnow())
    clone.desired_state = lifecycle.desired_state(clone, config)
    flush()
    origin = f"backup {backup.id}" if backup else "a new backup"
    LogEntry(instance=clone, message=f"clone of {source.subdomain} (store {source.id}) "
                                     f"requested from {origin}")
    LogEntry(instance=source, message=f"cloned into {name} (store {clone.id})")
    job = jobs.enqueue(JobKind.CLONE, instance=clone,
                       detail=f"{source.id}:{backup.id if backup else 'new'}")
    return clone, job


# -- the worker's side ------------------------------------------------------------------

def run_job(config: Config, job_id: int) -> str:
    """worker._care: one BACKUP, RESTORE or CLONE job."""
    with db_session:
        job = Job[job_id]
        kind, detail = job.kind, job.detail or ""
        instance_id = job.instance.id if job.instance else None
    if kind == JobKind.BACKUP:
        return backup(config, [instance_id] if instance_id else None,
                      reason=detail or ("manual" if instance_id else "scheduled"))
    if kind == JobKind.RESTORE:
        return restore(config, instance_id, int(detail))
    source_id, _, which = detail.partition(":")
    with db_session:
        last_try = Job[job_id].attempts + 1 >= config.job_max_attempts
    return clone(config, instance_id, int(source_id), None if which == "new" else int(which),
                 last_try=last_try)


def backup(config: Config, instance_ids: list[int] | None, reason: str) -> str:
    """Back up the given stores (None: every running store) in one run; each store's
    result recorded and alerted on its own. Raises BackupFailed when one failed, so a
    single store's job retries (a scheduled run is retried by the next schedule)."""
    with db_session:
        stores = select(i for i in Instance if i.live and i.provisioned_at is not None
                        and i.status in BACKED_UP)
        if instance_ids is None:
            stores = stores.filter(lambda i: i.status == StoreState.RUNNING)
        else:
            stores = stores.filter(lambda i: i.id in instance_ids)
        now = utcnow()
        planned: list[tuple[int, StoreVars, list[int]]] = []
        for instance in stores.order_by(Instance.id):
            path = archive_path(config, instance, now)
            row = Backup(instance=instance, path=path, docker_host=instance.docker_host,
                         reason=reason, created_at=now)
            dropped = expired(config, instance, now, reason)
            planned.append((row, of_instance(config, instance).with_(
                backup=path, backup_remove=tuple(b.path for b in dropped)),
                [b.id for b in dropped]))
        commit()
        planned = [(row.id, store, dropped) for row, store, dropped in planned]
    if not planned:
        return "backup: no store to back up"
    failed, lines = [], []
    for start in range(0, len(planned), RUN_SIZE):
        chunk = planned[start:start + RUN_SIZE]
        result = operations.run(config, Operation.BACKUP, [store for _, store, _ in chunk])
        with db_session:
            for backup_id, store, dropped in chunk:
                outcome = result.hosts[store.name]
                error, line = _record(Backup[backup_id], outcome.ok, outcome.error,
                                      result.store_results.get(store.name, {}), dropped)
                if error:
                    failed.append(f"{store.name}: {error}")
                lines.append(line)
    if failed and instance_ids is not None:
        raise BackupFailed("; ".join(failed))
    if len(lines) == 1:
        return lines[0]
    return f"backup ({reason}): {len(planned) - len(failed)} made, {len(failed)} failed" + \
        (f": {'; '.join(failed)}"[:2000] if failed else "")


def _record(row: Backup, ok: bool, error: str | None, made: dict,
            dropped: list[int]) -> tuple[str | None, str]:
    """One store's backup result on its row, its log and its alert: the error if any,
    and the line logged."""
    instance = row.instance
    row.finished_at = utcnow()
    if not ok or not made.get("sha256"):
        row.status = "failed"
        row.error = error or "the run did not say what it made"
        LogEntry(instance=instance, level="error", message=f"backup failed: {row.error}")
        alerts.raise_alert("backup_failed", f"store {instance.subdomain}: backup failed: "
                                            f"{row.error}", instance)
        return row.error, f"{instance.subdomain}: backup failed: {row.error}"
    row.status, row.sha256 = "ok", str(made["sha256"])
    row.size_bytes = int(made.get("size_bytes") or 0)
    row.copy_path = str(made.get("copy_path") or "") or None
    for old in dropped:
        Backup[old].status, Backup[old].deleted_at = "deleted", row.finished_at
    paused = float(made.get("paused_seconds") or 0)
    line = (f"backup ({row.reason}) made: {row.path}, {row.size_bytes} bytes, "
            f"{made.get('mode')}" + (f" {paused:g} s" if paused else "")
            + (f", copied to {row.copy_path}" if row.copy_path else "")
            + (f", {len(dropped)} older deleted" if dropped else ""))
    LogEntry(instance=instance, message=line)
    copy_error = str(made.get("copy_error") or "")
    if copy_error:
        row.error = copy_error
        alerts.raise_alert("backup_failed", f"store {instance.subdomain}: backup made but "
                                            f"its second copy failed: {copy_error}", instance)
    else:
        alerts.resolve("backup_failed", instance)
    return None, line


def restore(config: Config, instance_id: int, backup_id: int) -> str:
    """Put a backup back: refused before anything changes when it does not verify; a
    failure later puts the store's own data back. Never retried: the same archive
    would fail the same way (an admin asks again)."""
    with db_session:
        instance, row = Instance[instance_id], Backup[backup_id]
        if row.instance != instance or row.status != "ok":
            raise Refused(f"backup {backup_id} is not a good backup of {instance.subdomain}")
        if not instance.live or instance.status != StoreState.RUNNING:
            # Suspended or stopped since it was asked: restore.yml would start it.
            raise Refused(f"store {instance.subdomain} is {instance.status} now; only a "
                          "running store is restored")
        store = of_instance(config, instance).with_(restore_from=row.path,
                                                    restore_sha256=row.sha256)
        LogEntry(instance=instance, message=f"restore from backup {row.id} ({row.path}) "
                                            "started")
    outcome = operations.run(config, Operation.RESTORE, [store]).hosts[store.name]
    with db_session:
        instance = Instance[instance_id]
        if not outcome.ok:
            LogEntry(instance=instance, level="error", message=f"restore failed: {outcome.error}")
            raise Refused(f"restore of {instance.subdomain} failed: {outcome.error}")
        LogEntry(instance=instance, message=f"restored from backup {backup_id}, running")
    return f"restored {store.name} from backup {backup_id}"


def clone(config: Config, clone_id: int, source_id: int, backup_id: int | None,
          last_try: bool = False) -> str:
    """A new store on a copy of another's data: a backup of the source made now (or the
    one asked for), unpacked into the clone's data dir, its container and vhost made."""
    if backup_id is None:
        asked = utcnow()
        backup(config, [source_id], reason="clone")  # raises (a retry) when it failed
        with db_session:
            made = latest_good(Instance[source_id])
            if made is None or made.created_at < asked:
                raise Refused(f"store {Instance[source_id].subdomain} could not be backed "
                              "up for the clone (it no longer has data to copy)")
            backup_id = made.id
    with db_session:
        instance, row = Instance[clone_id], Backup[backup_id]
        store = of_instance(config, instance).with_(
            restore_from=row.path, restore_sha256=row.sha256, restore_exclude=CLONE_EXCLUDE)
    outcome = operations.run(config, Operation.RESTORE, [store]).hosts[store.name]
    with db_session:
        instance = Instance[clone_id]
        if not outcome.ok:
            # Failed for good on the last try: it must not be provisioned empty later.
            lifecycle.failed(instance, outcome.error or "clone failed", retrying=not last_try)
            raise RuntimeError(f"clone into {instance.subdomain} failed: {outcome.error}")
        lifecycle.converged(instance, StoreState.RUNNING)
        lifecycle.reconcile(instance, config)
        LogEntry(instance=instance, message=f"cloned from backup {backup_id}, running")
    return f"cloned {store.name} from backup {backup_id}"
