"""SIGTERM to a `provisioner worker` in the middle of a provisioning run: it cancels the
run after STOP_GRACE_SECONDS, leaves no run `running` and no process of it behind, puts
the store's job back in the queue untried, and exits; the next worker provisions it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from pony.orm import db_session

from provisioner.models import AnsibleRun, Instance
from provisioner.testing import stripe_events
from provisioner.testing.faults import live_processes
from tests.integration.conftest import poll, wait_until_live

STOP_GRACE_SECONDS = 2
# After the grace: ansible-runner's next look at the cancel check (1 s), the run's
# processes ended (SIGKILL after 5 s at worst), the outcome recorded, the lanes joined.
STOP_BOUND_SECONDS = 20
# An nginx whose first call never returns: the run is reliably mid-way when SIGTERM comes.
HANGING_NGINX = """\
#!/bin/sh
touch {hung}
exec sleep {nap}
"""


def _running_runs() -> list[tuple[str, str, int | None]]:
    with db_session:
        return [(r.ident, r.playbook, r.pid) for r in AnsibleRun.select(status="running")]


def _worker(service, tmp_path: Path, nginx_bin: Path) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    env = {**service.env, "PATH": f"{bin_dir}:{service.env['PATH']}",
           "NGINX_BIN": str(nginx_bin), "STOP_GRACE_SECONDS": str(STOP_GRACE_SECONDS)}
    with (tmp_path / "worker.log").open("w") as log:
        return subprocess.Popen([str(bin_dir / "provisioner"), "worker"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_sigterm_mid_run_cancels_it_and_queues_the_job_again(service, tmp_path):
    name = "sigterm-shop"
    nap = 3600 + secrets.randbelow(10**6)
    hung = tmp_path / "hung"
    nginx_bin = tmp_path / "nginx"
    nginx_bin.write_text(HANGING_NGINX.format(hung=hung, nap=nap))
    nginx_bin.chmod(0o755)
    runs_dir = str(service.config.ansible_runs_dir).encode()
    service.paused.set()  # the service's own worker stays out of it
    try:
        for evt in stripe_events.signup(subdomain=name, site_name="Sigterm",
                                        email=f"{name}@example.com"):
            service.post_event(evt)
        worker = _worker(service, tmp_path, nginx_bin)
        try:
            poll(hung.exists, timeout=90, what="the worker's provisioning run to reach nginx")
            [(ident, playbook, pid)] = _running_runs()
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=STOP_GRACE_SECONDS + STOP_BOUND_SECONDS)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    "the worker did not stop after SIGTERM:\n"
                    + (tmp_path / "worker.log").read_text()[-3000:]) from None
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert playbook == "provision.yml" and pid
        assert _running_runs() == []
        with db_session:
            assert AnsibleRun.get(ident=ident).status == "canceled"
            store = Instance.get(subdomain=name)
            [job] = store.jobs.select(lambda j: j.kind == "converge")[:]
            assert (job.state, job.attempts) == ("queued", 0), job.last_error
        assert not live_processes(b"ansible-playbook", runs_dir), \
            "an ansible-playbook of the stopped worker is still alive"
        assert not live_processes(b"sleep\0" + str(nap).encode()), \
            "the hung task's command is still alive"
    finally:
        service.paused.clear()
        service.wake()
    wait_until_live(name, timeout=120)
