"""Tell the provisioner about a playbook run a sysadmin started by hand.

Loaded by every ansible-playbook run of these playbooks (plugins beside a playbook
need no configuration). The service's own runs carry PROVISIONER_ANSIBLE_RUN and
are recorded by the service itself; any other run is sent, when it ends, to
`provisioner record-run`, which keeps it as a run of its stores (with the user and
host) and takes over what it did: a store stopped by hand stays stopped instead of
being started again by the next health sweep. Check-mode runs change nothing and
are not sent.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ansible import context
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: provisioner_sysadmin_runs
type: aggregate
short_description: records sysadmins' runs with the eBuilder provisioner
description:
  - Sends each run not started by the provisioner to C(provisioner record-run).
"""

SERVICE_RUN_MARK = "PROVISIONER_ANSIBLE_RUN"
PROJECT = Path(__file__).resolve().parents[2]


def provisioner_python() -> str | None:
    """This Python when it has the provisioner, else the project's venv."""
    if importlib.util.find_spec("provisioner") is not None:
        return sys.executable
    venv = PROJECT / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else None


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "provisioner_sysadmin_runs"
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = not os.environ.get(SERVICE_RUN_MARK)
        self.task_started = time.monotonic()
        # One record per playbook (ansible-playbook takes several, one after the other).
        self.records: list[dict] = []
        self.current: dict | None = None

    def v2_playbook_on_start(self, playbook):
        self._close()
        self.current = {"playbook": str(Path(playbook._basedir) / Path(playbook._file_name).name),
                        "user": os.environ.get("SUDO_USER") or getpass.getuser(),
                        "host": socket.gethostname(),
                        "started_at": datetime.now(UTC).isoformat(), "hosts": {}, "tasks": []}

    def _close(self, stats=None) -> None:
        """The playbook ended: its hosts' outcome, from the final stats for the last one
        (a failure rescued by a block does not count there), from the failures seen for
        the others (there a rescued failure counts: the store is not taken over)."""
        if self.current is None:
            return
        if self.current["hosts"]:
            if stats is not None:
                for host, entry in self.current["hosts"].items():
                    summary = stats.summarize(host)
                    entry["ok"] = not (summary.get("failures") or summary.get("unreachable"))
            self.current["finished_at"] = datetime.now(UTC).isoformat()
            self.records.append(self.current)
        self.current = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self.task_started = time.monotonic()

    def _seen(self, result, outcome: str, error: str = "") -> None:
        if self.current is None or not self.active:
            return
        host = result._host.get_name()
        entry = self.current["hosts"].setdefault(host, {"ok": True, "error": "", "result": {}})
        if error:
            entry["ok"], entry["error"] = False, error
        made = (result._result.get("ansible_facts") or {}).get("provisioner_store_result")
        if isinstance(made, dict):
            entry["result"] = {k: str(v) for k, v in made.items()}
        self.current["tasks"].append({
            "host": host, "task": result._task.get_name(), "outcome": outcome,
            "duration": round(time.monotonic() - self.task_started, 3)})

    def v2_runner_on_ok(self, result):
        self._seen(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_skipped(self, result):
        self._seen(result, "skipped")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if ignore_errors:
            self._seen(result, "ok")
        else:
            self._seen(result, "failed", str(result._result.get("msg") or "failed")[:2000])

    def v2_runner_on_unreachable(self, result):
        self._seen(result, "unreachable",
                   "unreachable: " + str(result._result.get("msg") or "")[:2000])

    def v2_playbook_on_stats(self, stats):
        self._close(stats)
        if not self.active or not self.records:
            return
        if context.CLIARGS.get("check"):
            self._display.display("provisioner: a check-mode run changes nothing; not recorded")
            return
        self._send(self.records)

    def _send(self, records: list[dict]) -> None:
        python = provisioner_python()
        if python is None:
            self._not_recorded("the provisioner's Python was not found")
            return
        try:
            done = subprocess.run([python, "-m", "provisioner.cli", "record-run"],
                                  input=json.dumps(records), capture_output=True, text=True,
                                  timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._not_recorded(str(exc))
            return
        if done.returncode != 0:
            self._not_recorded(done.stderr.strip() or f"exit {done.returncode}")
            return
        for line in done.stdout.splitlines():
            self._display.display(f"provisioner: {line}")

    def _not_recorded(self, why: str) -> None:
        self._display.warning(
            f"this run was NOT recorded by the provisioner ({why}); until it is, the "
            f"service may undo it (a stopped store is started by the next health sweep)")
