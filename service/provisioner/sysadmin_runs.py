"""Playbook runs a sysadmin started by hand (`ansible-playbook playbooks/stop.yml
--limit janes-shop`), told to us by the playbooks' callback plugin
(playbooks/callback_plugins/provisioner_sysadmin_runs.py, through `provisioner
record-run`).

Each is kept as a run of the stores it touched, with who ran it from where, so it
shows on their pages. A store it started, stopped, restarted, suspended or destroyed
is then what the service wants, as if an admin had pressed the button: a manual
stop holds the store against billing, so the next health sweep or sync does not
start it again behind the sysadmin's back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePath

from pony.orm import db_session

from provisioner import docker_hosts, domains, lifecycle
from provisioner.config import Config
from provisioner.models import AnsibleRun, AuditEntry, Instance, LogEntry
from provisioner.redaction import redact
from provisioner.states import StoreState, transition

# The playbooks whose effect the service takes over, and as which admin action.
ACTIONS = {"start.yml": "start", "stop.yml": "stop", "restart.yml": "restart",
           "suspend.yml": "suspend", "destroy.yml": "destroy", "move.yml": "move"}
STARTS = frozenset({"start", "restart"})
TASKS_KEPT = 500


class BadRecord(ValueError):
    """What the callback sent is not a run record."""


@dataclass(frozen=True)
class HostOutcome:
    ok: bool
    error: str = ""
    # The run's `provisioner_store_result` fact for the host (destroy: its archive).
    result: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ManualRun:
    playbook: str
    user: str
    host: str
    started_at: datetime
    finished_at: datetime
    hosts: dict[str, HostOutcome]
    tasks: list[dict] = field(default_factory=list)

    @property
    def by(self) -> str:
        return f"{self.user} on {self.host}"

    @property
    def name(self) -> str:
        return PurePath(self.playbook).name


def parse(data: object) -> ManualRun:
    """The callback's JSON, checked: a sysadmin's tool may be older or newer than us."""
    if not isinstance(data, dict):
        raise BadRecord("a run record is a JSON object")
    try:
        hosts = {str(name): HostOutcome(ok=bool(h["ok"]), error=str(h.get("error") or ""),
                                        result=h.get("result") or {})
                 for name, h in dict(data["hosts"]).items()}
        tasks = [{"host": str(t["host"]), "task": str(t["task"])[:300],
                  "outcome": str(t["outcome"])[:20], "duration": float(t.get("duration") or 0)}
                 for t in list(data.get("tasks") or [])[-TASKS_KEPT:]]
        return ManualRun(playbook=str(data["playbook"]), user=str(data["user"])[:100],
                         host=str(data["host"])[:200],
                         started_at=_naive(datetime.fromisoformat(data["started_at"])),
                         finished_at=_naive(datetime.fromisoformat(data["finished_at"])),
                         hosts=hosts, tasks=tasks)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadRecord(f"not a run record: {exc!r}") from None


def _naive(moment: datetime) -> datetime:
    """UTC without a zone, as the DB keeps every moment."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def record(config: Config, run: ManualRun) -> list[str]:
    """Keep the run and take over what it did; the lines say what became of each store."""
    action = ACTIONS.get(run.name)
    hidden = config.secrets()
    lines: list[str] = []
    with db_session:
        stores = {name: Instance.get(subdomain=name, live=True) for name in run.hosts}
        touched = {name: i for name, i in stores.items() if i is not None}
        failed = [name for name, h in run.hosts.items() if not h.ok]
        row = AnsibleRun(ident=f"sysadmin-{run.finished_at:%Y%m%dT%H%M%S}-"
                               f"{secrets.token_hex(3)}",
                         playbook=run.name, status="failed" if failed else "successful",
                         rc=2 if failed else 0, artifact_dir="-", started_at=run.started_at,
                         finished_at=run.finished_at, started_by=run.by[:300])
        for task in run.tasks:
            LogEntry(level="info", message=f"{task['host']}: {task['task']}", ansible_run=row,
                     instance=touched.get(task["host"]), task=task["task"],
                     outcome=task["outcome"], duration=task["duration"])
        for name, instance in touched.items():
            outcome = run.hosts[name]
            moved_to = str(outcome.result.get("docker_host") or "") if action == "move" else ""
            if moved_to and moved_to in {h.name for h in docker_hosts.load_hosts(config)}:
                # It serves from there, even if cleaning up the old host failed after.
                instance.docker_host = moved_to
            if not outcome.ok:
                error = redact(outcome.error, hidden)[:2000] or "failed"
                LogEntry(instance=instance, ansible_run=row, level="error",
                         message=f"{run.name} run by {run.by} failed: {error}")
                lines.append(f"{name}: {run.name} failed; nothing taken over")
                continue
            LogEntry(instance=instance, ansible_run=row,
                     message=f"{run.name} run by {run.by}: ok")
            lines.append(f"{name}: {_take_over(config, instance, action, outcome, run.by)}")
        AuditEntry(actor=f"sysadmin:{run.by}"[:200], action=f"playbook {run.name}",
                   target=None, detail=f"run {row.ident}: {len(touched)} store(s)"
                   + (f", failed: {', '.join(sorted(failed))}" if failed else ""))
        lines.insert(0, f"recorded as run {row.id} ({row.ident}) by {run.by}")
        unknown = sorted(set(run.hosts) - set(touched))
        if unknown:
            lines.append(f"not stores of ours: {', '.join(unknown)}")
    return lines


def _take_over(config: Config, instance: Instance, action: str | None, outcome: HostOutcome,
               by: str) -> str:
    """Make the run's effect what the service wants (needs a db_session)."""
    who = f"a sysadmin ({by})"
    if action is None:
        return "recorded"
    if action == "move":
        return f"moved to {instance.docker_host}"
    if action == "destroy":
        domains.store_ended(config, instance)
        lifecycle.destroyed(instance, str(outcome.result.get("archive") or "") or None)
        return f"destroyed (archive {instance.archive_path or 'unknown'})"
    if action in STARTS and instance.desired_state != StoreState.RUNNING:
        # Billing decides whether a store runs: the service puts it back as billing says.
        transition(instance, StoreState.OUT_OF_STEP,
                   f"{action} by {who}, but billing says {instance.desired_state}")
        LogEntry(instance=instance, level="warning",
                 message=f"{action} by {who}, but billing says {instance.desired_state}: "
                         f"the service converges it back")
        lifecycle.reconcile(instance, config)
        return f"{action} not kept: billing says {instance.desired_state}"
    lifecycle.acted(instance, action, by=who)
    return {"stop": "stopped, held against billing until an admin starts it",
            "suspend": "suspended, held against billing until an admin starts it"
            }.get(action, "running")
