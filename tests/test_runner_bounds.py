"""Real ansible-playbook runs that must end: at the run timeout, when the worker
cancels them, and when a dead worker left one behind. Whichever way, none of the
run's processes (ansible-playbook, its forked workers, the task's command) is left."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pony.orm import db_session

from provisioner.ansible import recording
from provisioner.ansible.runner import run_playbook
from provisioner.models import AnsibleRun
from provisioner.testing.faults import live_processes

NAP_PLAYBOOK = """\
- name: Take a nap
  hosts: stores
  gather_facts: false
  tasks:
    - name: Nap
      ansible.builtin.command: sleep {{ nap_seconds | default(%d) }}
      changed_when: false
      delegate_to: localhost
"""
STORE = {"name": "store0", "instance_id": "0", "site_name": "s", "admin_email": "e@x.io",
         "port": 19000, "docker_host": "localhost"}


@pytest.fixture
def nap_seconds() -> int:
    """A sleep no other process here has: how the task's own command is found."""
    return 3600 + secrets.randbelow(10**6)


@pytest.fixture
def project(ansible_project, nap_seconds):
    (ansible_project.playbooks_dir / "nap.yml").write_text(NAP_PLAYBOOK % nap_seconds)
    return ansible_project


def _leftovers(ident: str, nap_seconds: int, deadline: float = 15) -> list[int]:
    """What is still alive of the run once `deadline` seconds have passed (or nothing)."""
    give_up = time.monotonic() + deadline
    while True:
        left = live_processes(b"ansible-playbook", ident.encode()) + \
            live_processes(b"sleep\0" + str(nap_seconds).encode())
        if not left or time.monotonic() > give_up:
            return left
        time.sleep(0.1)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_the_run_timeout_ends_the_run_and_all_its_processes(project, nap_seconds):
    config = dataclasses.replace(project, run_timeout_seconds=3)
    result = run_playbook(config, "nap.yml", [STORE])
    left = _leftovers(result.ident, nap_seconds)
    _kill(left)
    assert result.status == "timeout" and result.timed_out and not result.cancelled
    outcome = result.hosts["store0"]
    assert not outcome.ok and not outcome.cancelled
    assert outcome.error.startswith("ansible run timed out after 3 s"), outcome.error
    assert not left, f"processes of the timed-out run still alive: {left}"


def test_a_cancelled_run_ends_with_its_processes_and_keeps_our_signal_handlers(
        project, nap_seconds):
    napping = threading.Event()

    def on_event(event: dict) -> None:
        if event.get("event") == "runner_on_start" and \
                (event.get("event_data") or {}).get("task") == "Nap":
            napping.set()

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = run_playbook(project, "nap.yml", [STORE], on_event=on_event, cancel=napping.is_set)
    left = _leftovers(result.ident, nap_seconds)
    _kill(left)
    assert napping.is_set(), "the run never reached its long task"
    assert result.status == "canceled" and result.cancelled and not result.timed_out
    outcome = result.hosts["store0"]
    assert not outcome.ok and outcome.cancelled and outcome.error.startswith("cancelled:")
    assert not left, f"processes of the cancelled run still alive: {left}"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_a_run_without_cancel_keeps_our_signal_handlers(project):
    """ansible-runner installs its own SIGTERM handler unless given a cancel callback;
    then SIGTERM no longer stops the service."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = run_playbook(project, "nap.yml", [STORE], extra_vars={"nap_seconds": 0})
    assert result.status == "successful", result.hosts
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_the_run_records_ansible_playbooks_pid(project):
    no_nap = functools.partial(run_playbook, extra_vars={"nap_seconds": 0})
    result = recording.recorded_run(project, "nap.yml", [STORE], None, runner=no_nap,
                                    jobs={}, redact_values=[])
    assert result.status == "successful", result.hosts
    with db_session:
        run = AnsibleRun[result.run_id]
        assert run.status == "successful" and run.finished_at is not None
        assert run.pid and run.pid != os.getpid()


def test_a_runner_that_raises_leaves_no_run_running(project):
    def broken_runner(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recording.recorded_run(project, "nap.yml", [STORE], None, runner=broken_runner,
                               jobs={}, redact_values=[])
    with db_session:
        assert [(r.status, r.finished_at is not None) for r in AnsibleRun.select()] == \
            [("error", True)]


def _orphan_script(project, database: Path) -> str:
    """A worker of its own on the same database, running the nap playbook."""
    env = {"STRIPE_WEBHOOK_SECRET": "whsec_x", "BASE_DOMAIN": "stores.test",
           "DATABASE_URL": f"sqlite:///{database}"}
    return (
        "import dataclasses, pathlib\n"
        "from provisioner import models\n"
        "from provisioner.config import load_config\n"
        "from provisioner.ansible import recording\n"
        "from provisioner.ansible.runner import run_playbook\n"
        f"config = dataclasses.replace(load_config({env!r},"
        " env_file=pathlib.Path('/nonexistent')),"
        f" project_dir=pathlib.Path({str(project.project_dir)!r}),"
        f" data_dir=pathlib.Path({str(project.data_dir)!r}))\n"
        "config = models.open_database(config)\n"
        f"recording.recorded_run(config, 'nap.yml', [{STORE!r}], None, runner=run_playbook,"
        " jobs={}, redact_values=[])\n")


def _napping_run(process: subprocess.Popen, nap_seconds: int) -> tuple[int, str, int]:
    """The row of the subprocess's run once its ansible-playbook is known and napping."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, "the run never started its nap"
        with db_session:
            run = AnsibleRun.select().first()
            row = (run.id, run.ident, run.pid) if run is not None and run.pid else None
        if row and live_processes(b"sleep\0" + str(nap_seconds).encode()):
            return row
        time.sleep(0.1)


def test_recovery_ends_the_playbook_a_killed_worker_left(project, config, nap_seconds):
    process = subprocess.Popen([sys.executable, "-c",
                                _orphan_script(project, config.database_path)])
    try:
        run_id, ident, pid = _napping_run(process, nap_seconds)
    finally:
        process.kill()
        process.wait(timeout=10)
    try:
        assert live_processes(b"ansible-playbook", ident.encode()), \
            "the killed worker's playbook should live on (its own session)"
        done = recording.recover_abandoned_runs(project)
        left = _leftovers(ident, nap_seconds)
    finally:
        _kill(live_processes(b"ansible-playbook", ident.encode()))
    assert not left, f"processes of the abandoned run still alive: {left}"
    assert len(done) == 1 and ident in done[0]
    with db_session:
        run = AnsibleRun[run_id]
        assert run.status == "abandoned" and run.finished_at is not None and run.pid == pid


def test_recovery_spares_a_process_that_only_has_the_runs_pid(project):
    """The pid of a dead run's ansible-playbook can belong to anything by now."""
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        with db_session:
            AnsibleRun(ident="provision-0123456789ab", playbook="provision.yml",
                       artifact_dir="/nonexistent", pid=bystander.pid)
        done = recording.recover_abandoned_runs(project)
        assert bystander.poll() is None, "recovery killed a process that was not the run's"
    finally:
        bystander.kill()
        bystander.wait(timeout=10)
    assert done == ["run provision-0123456789ab: abandoned, 0 processes ended"]
    with db_session:
        run = AnsibleRun.get(ident="provision-0123456789ab")
        assert run.status == "abandoned" and run.finished_at is not None


def test_recovery_leaves_a_run_another_live_process_holds(project):
    """A CLI command's run in progress is not a dead worker's."""
    run_dir = project.ansible_runs_dir / "health-live0123456"
    run_dir.mkdir(parents=True)
    with db_session:
        AnsibleRun(ident="health-live0123456", playbook="health.yml", artifact_dir=str(run_dir))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(run_dir / '.lock')!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert "still in progress" in recording.recover_abandoned_runs(project)[0]
        with db_session:
            assert AnsibleRun.get(ident="health-live0123456").status == "running"
    finally:
        holder.kill()
        holder.wait(timeout=10)
    recording.recover_abandoned_runs(project)
    with db_session:
        assert AnsibleRun.get(ident="health-live0123456").status == "abandoned"


def test_a_module_that_raised_under_mitogen_fails_with_its_reason(tmp_path):
    """Mitogen runs a module in-process: one that raises (ansible-core's atomic_move on a
    full disk) leaves only a traceback; the store's error names the cause, not the
    unreadable result."""
    from provisioner.ansible.runner import _error_of

    stderr = (
        "Traceback (most recent call last):\n"
        '  File "master:/x/ansible/module_utils/basic.py", line 1780, in atomic_move\n'
        "OSError: [Errno 28] No space left on device: b'/root/.ansible/tmp/a/.source' "
        "-> b'/srv/customers/7/.ansible_tmpc4'\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        '  File "master:/x/ansible/module_utils/basic.py", line 1809, in atomic_move\n'
        "    raise Exception(f'Failed to replace {dest!r} with {src!r}.') from ex\n"
        "Exception: Failed to replace '/srv/customers/7/.installation' with b'.source'.\n")
    event = {"event": "runner_on_failed", "event_data": {"res": {
        "msg": "Module result deserialization failed: No start of json char found",
        "module_stderr": stderr, "module_stdout": "", "rc": 1}}}
    assert _error_of(event) == (
        "module failed: OSError: [Errno 28] No space left on device: "
        "b'/root/.ansible/tmp/a/.source' -> b'/srv/customers/7/.ansible_tmpc4' -> "
        "Exception: Failed to replace '/srv/customers/7/.installation' with b'.source'.")
    plain = {"event_data": {"res": {"msg": "docker_container failed"}}}
    assert _error_of(plain) == "docker_container failed"
