"""Playbook runs as the provisioning log sees them: the one place an AnsibleRun
row is made, its task events streamed into LogEntry rows as they happen, its
outcome recorded. Every run the service or a CLI command starts goes through here.

A row is `running` only while its run lives: whatever run_playbook returns or
raises is written back, and a worker starting up ends what a dead predecessor
left (`recover_abandoned_runs`)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil

from pony.orm import db_session, flush, select

from provisioner.ansible.runner import (
    RunResult,
    artifact_dir,
    end_run_processes,
    new_ident,
    outcomes_of,
)
from provisioner.config import Config
from provisioner.models import AnsibleRun, Instance, Job, LogEntry, record_durably, utcnow
from provisioner.redaction import redact

log = logging.getLogger(__name__)

TASK_OUTCOMES = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}


def _instance_id(store: dict) -> int | None:
    try:
        return int(store["instance_id"])
    except (KeyError, ValueError):
        return None


def recorded_run(config: Config, playbook: str, stores: list[dict], secrets: dict | None,
                 *, runner, jobs: dict[str, int], redact_values: list[str],
                 cancel=None, extra_vars: dict | None = None, quiet: bool = False) -> RunResult:
    """Run a playbook for `stores`: the AnsibleRun row, live task events, the outcome.

    Each database write is its own short transaction: none spans the run. A
    `quiet` run logs only failed and changed tasks, and leaves no artifacts when
    every store passed."""
    ident = new_ident(playbook)
    with db_session:
        run = AnsibleRun(ident=ident, playbook=playbook,
                         artifact_dir=str(artifact_dir(config, ident)))
        for job_id in jobs.values():
            Job[job_id].ansible_run = run
        flush()
        run_id = run.id
        ids = [n for n in (_instance_id(s) for s in stores) if n is not None]
        known_ids = set(select(i.id for i in Instance if i.id in ids)) if ids else set()
    hosts = {}
    for store in stores:
        instance_id = _instance_id(store)
        hosts[store["name"]] = (instance_id if instance_id in known_ids else None,
                                jobs.get(store["name"]))
    values = [*redact_values, *config.secrets(),
              *(s.get("admin_password", "") for s in (secrets or {}).values())]
    sink = _EventSink(run_id, hosts, values, quiet=quiet)
    try:
        result = runner(config, playbook, stores, secrets, on_event=sink, ident=ident,
                        **({"cancel": cancel} if cancel is not None else {}),
                        **({"extra_vars": extra_vars} if extra_vars else {}))
    except BaseException:  # KeyboardInterrupt and SystemExit too: never left `running`
        record_durably(lambda: _finished(run_id, "error"), f"the end of ansible run {ident}", log)
        raise
    # The run happened: its end is recorded however long the database is busy.
    record_durably(lambda: _finished(run_id, result.status, result.rc,
                                     str(result.artifact_dir)),
                   f"the end of ansible run {ident}", log)
    result.run_id = run_id
    if quiet and result.status == "successful" and all(h.ok for h in result.hosts.values()):
        shutil.rmtree(config.ansible_runs_dir / ident, ignore_errors=True)
    return result


def _finished(run_id: int, status: str, rc: int | None = None,
              artifacts: str | None = None) -> None:
    run = AnsibleRun[run_id]
    run.status, run.finished_at = status, utcnow()
    if rc is not None:
        run.rc = rc
    if artifacts is not None:
        run.artifact_dir = artifacts


def _run_dir_in_use(config: Config, ident: str) -> bool:
    """Whether a live process still holds the run's lock (runner._private_run_dir):
    a run some other process (a CLI command) is doing right now is not abandoned."""
    try:
        fd = os.open(config.ansible_runs_dir / ident / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def recover_abandoned_runs(config: Config) -> list[str]:
    """End the runs a dead worker left `running`: their processes, then the rows.

    For a worker starting up (one worker per database). A recorded pid counts
    only while it is still ansible-playbook of that run (pids are reused).
    Returns one line per run, for the log."""
    with db_session:
        left = [(r.id, r.ident, r.pid) for r in AnsibleRun.select(status="running")]
    done = []
    for run_id, ident, pid in left:
        if _run_dir_in_use(config, ident):
            done.append(f"run {ident}: still in progress in another process, left alone")
            continue
        ended = end_run_processes(ident, leader=pid)
        with db_session:
            run = AnsibleRun[run_id]
            run.status, run.finished_at = "abandoned", utcnow()
            LogEntry(level="warning", ansible_run=run,
                     message=f"run {ident} was left running by a stopped worker; "
                             f"{len(ended)} of its processes ended")
        done.append(f"run {ident}: abandoned, {len(ended)} processes ended"
                    + (f" ({', '.join(map(str, ended))})" if ended else ""))
    return done


class _EventSink:
    """Streams ansible-runner task events into the provisioning log as they happen.

    A task that judges every store at once (runner.OUTCOMES_FACT) is logged as one
    entry per store it failed; what the play does after it is the run's, no store's
    (its run_once failure lands on whichever store was first)."""

    def __init__(self, run_id: int, hosts: dict[str, tuple[int, int]], secrets: list[str],
                 quiet: bool = False):
        self.run_id = run_id
        self.hosts = hosts
        self.secrets = secrets
        self.quiet = quiet
        self.judged = False

    def __call__(self, event: dict) -> None:
        if event.get("event") == "playbook_on_start" and event.get("pid"):
            self._record_pid(int(event["pid"]))
        outcome = TASK_OUTCOMES.get(event.get("event", ""))
        if outcome is None:
            return
        data = event.get("event_data") or {}
        res = data.get("res") or {}
        verdicts = outcomes_of(event)
        if verdicts:
            self.judged = True
            for store, verdict in verdicts.items():
                if verdict or not self.quiet:
                    self._log(store, data, "failed" if verdict else "ok", verdict)
            return
        if outcome == "ok" and res.get("changed"):
            outcome = "changed"
        if self.quiet and outcome in ("ok", "skipped"):
            return
        detail = ""
        if outcome in ("failed", "unreachable"):
            detail = res.get("censored") or res.get("msg") or res.get("stderr") or ""
        self._log(None if self.judged else data.get("host", ""), data, outcome, detail)

    def _log(self, host: str | None, data: dict, outcome: str, detail: str) -> None:
        instance_id, job_id = self.hosts.get(host, (None, None)) if host else (None, None)
        message = f"{data.get('task', '')}: {outcome}" + (f": {detail}" if detail else "")
        try:
            with db_session:
                LogEntry(level="error" if outcome in ("failed", "unreachable") else "info",
                         message=redact(message, self.secrets)[:4000], instance=instance_id,
                         job=job_id, ansible_run=self.run_id, task=data.get("task"),
                         outcome=outcome, duration=data.get("duration"))
        except Exception:  # a log write must never break the run it describes
            log.exception("could not record ansible event")

    def _record_pid(self, pid: int) -> None:
        """ansible-playbook's own pid: what a later worker ends if this one dies."""
        try:
            with db_session:
                AnsibleRun[self.run_id].pid = pid
        except Exception:
            log.exception("could not record the pid of ansible run %s", self.run_id)
