"""The worker: drains the job queue, batching store work into one ansible run.

Ansible's start-up dominates a run, so every converge job that is due at once
goes into a single playbook run (one inventory host per store, in parallel
up to the configured forks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from pony.orm import db_session, flush, select

from provisioner import events, jobs, lifecycle, notifications
from provisioner.config import Config
from provisioner.models import AnsibleRun, Instance, Job, LogEntry, utcnow
from provisioner.playbook_runs import artifact_dir, new_ident, run_playbook
from provisioner.redaction import redact
from provisioner.runs import recorded_run

log = logging.getLogger(__name__)


def store_vars(instance: Instance) -> dict:
    """What a playbook needs to know about a store (never its secrets)."""
    return {
        "name": instance.subdomain,
        "instance_id": str(instance.id),
        "site_name": instance.site_name,
        "admin_email": instance.admin_email,
        "port": instance.port,
        "docker_host": instance.docker_host,
        **({"image": instance.image} if instance.image else {}),
    }


VHOST_OF_STATE = {lifecycle.SUSPENDED: "suspended", lifecycle.CANCELLED: "closed"}


def store_record(config: Config, instance: Instance) -> dict:
    """store_vars plus where the store should be: for sync, nginx and the DB inventory."""
    desired = instance.desired_state
    state = desired if desired in lifecycle.CONVERGED else instance.status
    if instance.admin_hold and state == lifecycle.RUNNING:
        state = "stopped"
    return {**store_vars(instance), "image": instance.image or config.ebuilder_image,
            "state": state, "vhost": VHOST_OF_STATE.get(state, "present"),
            "page": VHOST_OF_STATE.get(state, "suspended")}


def recover_abandoned() -> int:
    """Requeue jobs a previous worker left running (run one worker per database)."""
    with db_session:
        abandoned = select(j for j in Job if j.state == "running")[:]
        for job in abandoned:
            job.state = "queued"
            job.locked_until = None
            job.next_run_at = utcnow()
            LogEntry(job=job, instance=job.instance, level="warning",
                     message=f"{job.kind} job {job.id} was left running; queued again")
        return len(abandoned)


class Worker:
    def __init__(self, config: Config, wake: threading.Event | None = None,
                 playbook_runner=run_playbook):
        self.config = config
        self.wake = wake or threading.Event()
        # The tests of billing logic swap in a recorder; everything else runs Ansible.
        self.run_playbook = playbook_runner

    # -- loop ----------------------------------------------------------------

    def run_forever(self, stop: threading.Event, paused: threading.Event | None = None) -> None:
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
            for job_id in by_kind.pop("event", []):
                self._one(job_id, self._apply_event)
            for job_id in by_kind.pop("reconcile", []):
                self._one(job_id, self._reconcile)
            for kind, batch in (("converge", self._converge), ("action", self._actions),
                                ("destroy", self._destroy)):
                ids = by_kind.pop(kind, [])
                if not ids:
                    continue
                try:
                    batch(ids)
                except Exception as exc:  # never leave a claimed job hanging
                    log.exception("%s batch failed", kind)
                    for job_id in ids:
                        self._fail(job_id, f"{type(exc).__name__}: {exc}")
            for job_id in by_kind.pop("notify", []):
                self._one(job_id, self._notify)
            for kind in MAINTENANCE:
                for job_id in by_kind.pop(kind, []):
                    self._one(job_id, self._maintenance)
            for kind, ids in by_kind.items():
                for job_id in ids:
                    self._fail(job_id, f"unknown job kind {kind!r}")

    # -- job kinds -----------------------------------------------------------

    def _one(self, job_id: int, work) -> None:
        """Run a job that lives in one transaction; any error rolls it back and retries."""
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

    def _maintenance(self, job: Job) -> None:
        """A scheduled health/sync/nginx/cleanup run: the CLI's functions, logged."""
        report = run_maintenance(self.config, job.kind, self.run_playbook)
        LogEntry(job=job, level="warning" if report.failed else "info",
                 message="\n".join([report.summary(), *report.lines])[:4000])

    def _notify(self, job: Job) -> None:
        notice, _, key = (job.detail or "").partition("|")
        if notice == "welcome" and job.instance.status != lifecycle.RUNNING:
            return  # the store went away before it was ready; no login to send
        notifications.send_notice(self.config, job.instance, notice, key or "-")

    def _fail(self, job_id: int, error: str) -> None:
        with db_session:
            job = Job[job_id]
            secrets = self._secrets_of([job.instance] if job.instance else [])
            error = redact(error, secrets)
            retrying = jobs.fail(job, error, max_attempts=self.config.job_max_attempts,
                                 base_seconds=self.config.job_retry_base_seconds)
            if job.event is not None:
                job.event.error = error
                job.event.failed_at = None if retrying else utcnow()
            if job.kind in ("converge", "destroy") and job.instance is not None:
                if retrying:
                    job.instance.status_message = f"retrying: {error}"
                else:
                    job.instance.set_status("failed", error)
        log.warning("job %s failed (%s): %s", job_id, "retrying" if retrying else "gave up", error)

    def _conflict(self, job_id: int, error: str) -> None:
        """Something not ours holds the store's name: an admin decides, nothing retries."""
        with db_session:
            job = Job[job_id]
            job.state, job.last_error, job.finished_at = "failed", error, utcnow()
            job.locked_until = None
            lifecycle.needs_attention(job.instance, error)
        log.warning("job %s: %s", job_id, error)

    def _secrets_of(self, instances: Iterable[Instance]) -> list[str]:
        values = [i.admin_password for i in instances if i and i.admin_password]
        return values + self.config.secrets()

    def _converge(self, job_ids: list[int]) -> None:
        """Bring every store in the batch to its desired state, one playbook run per state."""
        groups: dict[str, list[int]] = {}
        with db_session:
            for job_id in job_ids:
                job = Job[job_id]
                instance = job.instance
                desired = instance.desired_state
                if not instance.live or desired not in lifecycle.CONVERGED \
                        or instance.status == desired \
                        or (desired == lifecycle.RUNNING and instance.admin_hold):
                    jobs.complete(job)
                elif desired in lifecycle.STOPPED and instance.provisioned_at is None:
                    # Never built: nothing to stop, nobody to tell.
                    instance.set_status(desired)
                    jobs.complete(job)
                else:
                    groups.setdefault(desired, []).append(job_id)
        for desired, ids in groups.items():
            playbook = "provision.yml" if desired == lifecycle.RUNNING else "suspend.yml"
            extra = {"page": "suspended" if desired == lifecycle.SUSPENDED else "closed"} \
                if desired in lifecycle.STOPPED else {}
            self._run_batch(playbook, ids, extra,
                            on_success=lambda instance, d=desired: lifecycle.converged(instance, d))

    def _actions(self, job_ids: list[int]) -> None:
        """Admin start/stop/restart: one playbook run per action."""
        groups: dict[str, list[int]] = {}
        with db_session:
            for job_id in job_ids:
                groups.setdefault(Job[job_id].detail or "", []).append(job_id)
        for action, ids in groups.items():
            if action not in ADMIN_ACTIONS:
                for job_id in ids:
                    self._fail(job_id, f"unknown action {action!r}")
                continue
            playbook, extra = ADMIN_ACTIONS[action]
            self._run_batch(playbook, ids, extra,
                            on_success=lambda instance, a=action: _acted(instance, a))

    def _destroy(self, job_ids: list[int]) -> None:
        """Archive, verify, then remove stores past their deletion date."""
        stamp = utcnow().strftime("%Y%m%dT%H%M%S")
        ready = []
        with db_session:
            for job_id in job_ids:
                job = Job[job_id]
                instance = job.instance
                if not instance.live or instance.desired_state != lifecycle.CANCELLED:
                    jobs.complete(job)  # re-subscribed or already gone
                elif instance.provisioned_at is None:
                    _mark_destroyed(instance, None)
                    jobs.complete(job)
                else:
                    ready.append(job_id)
        if not ready:
            return
        archive_root = str(self.config.backup_root)

        def archive_of(instance: Instance) -> str:
            return f"{archive_root}/{instance.subdomain}-{instance.id}-{stamp}.tar.gz"

        self._run_batch("destroy.yml", ready, {},
                        per_store=lambda instance: {"archive": archive_of(instance)},
                        on_success=lambda instance: _mark_destroyed(instance, archive_of(instance)))

    def _run_batch(self, playbook: str, job_ids: list[int], extra: dict, on_success,
                   per_store=None) -> None:
        """One ansible run for all the jobs' stores; each job succeeds or fails on its host."""
        ident = new_ident(playbook)
        with db_session:
            run = AnsibleRun(ident=ident, playbook=playbook,
                             artifact_dir=str(artifact_dir(self.config, ident)))
            stores, secrets, hosts = [], {}, {}
            for job_id in job_ids:
                job = Job[job_id]
                instance = job.instance
                instance.status_message = f"running {playbook}"
                instance.updated_at = utcnow()
                job.ansible_run = run
                stores.append({**store_vars(instance), **extra,
                               **(per_store(instance) if per_store else {})})
                if instance.admin_password:
                    secrets[instance.subdomain] = {"admin_password": instance.admin_password}
                hosts[instance.subdomain] = (instance.id, job.id)
            flush()
            redact_values = self._secrets_of(Job[j].instance for j in job_ids)
            run_id = run.id
        try:
            result = recorded_run(self.config, playbook, stores, secrets, runner=self.run_playbook,
                                  ident=ident, run_id=run_id, redact_values=redact_values,
                                  job_of={name: job for name, (_, job) in hosts.items()})
        except Exception as exc:  # ansible-runner itself failed: every job retries
            for _, job_id in hosts.values():
                self._fail(job_id, f"ansible-runner: {type(exc).__name__}: {exc}")
            return
        for name, (instance_id, job_id) in hosts.items():
            outcome = result.hosts[name]
            if outcome.conflict:
                self._conflict(job_id, outcome.error)
                continue
            if not outcome.ok:
                self._fail(job_id, outcome.error or "failed")
                continue
            with db_session:
                instance = Instance[instance_id]
                LogEntry(instance=instance, job=Job[job_id], ansible_run=run_id,
                         message=f"{playbook} done ({outcome.changed} changed) in run {ident}")
                jobs.complete(Job[job_id])
                on_success(instance)


# action -> (playbook, extra store vars)
ADMIN_ACTIONS = {
    "start": ("start.yml", {}),
    "stop": ("stop.yml", {}),
    "restart": ("restart.yml", {}),
    "suspend": ("suspend.yml", {"page": "suspended"}),
    "unsuspend": ("provision.yml", {}),
}
MAINTENANCE = ("health", "sync", "nginx", "cleanup")


def run_maintenance(config: Config, kind: str, runner=run_playbook, progress=None):
    """One maintenance operation by name (job kinds and CLI commands share these)."""
    from provisioner import maintenance

    progress = progress or (lambda line: None)
    if kind == "health":
        return maintenance.health_sweep(config, runner, progress)
    if kind == "sync":
        return maintenance.sync(config, progress)
    if kind == "nginx":
        return maintenance.regenerate_vhosts(config, runner, progress)
    if kind == "cleanup":
        report = maintenance.Report("cleanup")
        with db_session:
            names = lifecycle.schedule_deletions()
        report.counts["due for deletion"] = len(names)
        report.lines += [f"{name}: archive then destroy queued" for name in names]
        for part in (maintenance.remove_orphans(config, progress),
                     maintenance.rotate_artifacts(config)):
            report.counts.update(part.counts)
            report.lines += part.lines
        return report
    raise ValueError(f"unknown maintenance {kind!r}")


def _acted(instance: Instance, action: str) -> None:
    """Record an admin action's result; stop and suspend hold the store against billing."""
    instance.admin_hold = action in ("stop", "suspend")
    status = {"stop": "stopped", "suspend": lifecycle.SUSPENDED}.get(action, lifecycle.RUNNING)
    if status == lifecycle.SUSPENDED and instance.stopped_since is None:
        instance.stopped_since = utcnow()
    instance.set_status(status, f"{action} by an admin")
    LogEntry(instance=instance, message=f"admin {action} done")


def _mark_destroyed(instance: Instance, archive: str | None) -> None:
    instance.live = False
    instance.archive_path = archive
    instance.destroyed_at = utcnow()
    instance.desired_state = lifecycle.DESTROYED
    instance.set_status(lifecycle.DESTROYED, f"archived to {archive}" if archive else None)
    LogEntry(instance=instance, message=f"destroyed; data archived to {archive}")


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
