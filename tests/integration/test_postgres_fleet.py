"""The service scaled out on PostgreSQL: the web tier (`provisioner serve --no-worker`)
and two workers (`provisioner worker`, separate processes with data dirs of their own,
as on different machines) share one database. Twenty stores signed up through the
webhook are all provisioned, each by exactly one playbook run, no job runs twice, and
both workers did the work.

The signups lane batches new stores into one run: the stores come in two waves, the
second while the first wave's run holds one worker, so the other builds it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from email import message_from_bytes
from pathlib import Path

import pytest

from provisioner.testing import stripe_events
from provisioner.testing.stack import free_port, wait_for_port
from tests.conftest import WEBHOOK_SECRET
from tests.integration.conftest import docker, poll

pytestmark = pytest.mark.integration
STORES = 20
PREFIX = "pgfleet"


class Fleet:
    """The web process and the workers, on one PostgreSQL database."""

    def __init__(self, postgres_server, url: str, env: dict, root: Path):
        self.server, self.url, self.env, self.root = postgres_server, url, env, root
        self.processes: list[subprocess.Popen] = []
        self.web_url = ""
        self.worker_dirs: list[Path] = []

    def _start(self, name: str, *args: str) -> Path:
        data = self.root / name
        bin_dir = Path(sys.executable).parent
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.processes.append(subprocess.Popen(
            [str(bin_dir / "provisioner"), *args],
            env={**self.env, "PROVISIONER_DATA_DIR": str(data),
                 "PATH": f"{bin_dir}:{self.env.get('PATH', '')}"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        return data

    def start(self, workers: int) -> None:
        port = free_port()
        self._start("web", "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port))
        self.worker_dirs = [self._start(f"worker{n}", "worker").resolve()
                            for n in range(workers)]
        wait_for_port(port, timeout=60)
        self.web_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}"
                         for log in sorted(self.root.glob("*.log")))

    def post(self, evt: dict) -> None:
        payload = stripe_events.encode(evt)
        request = urllib.request.Request(
            self.web_url + "/api/webhook/stripe/", data=payload, method="POST",
            headers={"Stripe-Signature": stripe_events.sign(payload, WEBHOOK_SECRET),
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def rows(self, sql: str, *args) -> list[tuple]:
        with contextlib.closing(self.server.connect(self.url.rsplit("/", 1)[1])) as connection, \
                connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()


def names(first: int, count: int) -> list[str]:
    return [f"{PREFIX}{n:02d}" for n in range(first, first + count)]


def test_two_workers_on_postgresql_provision_20_stores_each_once(
        postgres_server, live_env, live_config, nginx, smtp, tmp_path):
    url = postgres_server.create_database("fleet")
    env = {**live_env, "DATABASE_URL": url}
    label = f"label=ebuilder.installation={live_config.installation_id}"
    network = live_config.container_network
    # Two workers' first runs on a host would race to create its store network (each run
    # makes it one store at a time, two runs do not know of each other): made here once.
    made_network = not docker("network", "ls", "-q", "--filter", f"name=^{network}$")
    if made_network:
        docker("network", "create", "--label", "ebuilder.managed=true", "--label",
               f"ebuilder.installation={live_config.installation_id}", network)
    fleet = Fleet(postgres_server, url, env, tmp_path)
    sink = smtp[0]
    try:
        fleet.start(workers=2)

        def live() -> int:
            return fleet.rows("SELECT count(*) FROM instance WHERE live AND status = 'running' "
                              "AND welcome_sent_at IS NOT NULL")[0][0]

        started = time.monotonic()
        # Checkouts first; the payments (which start provisioning) come in two quick
        # waves, so the signups lane batches each wave into few runs.
        signups = {name: stripe_events.signup(subdomain=name, site_name=name.title(),
                                              email=f"{name}@example.com")
                   for name in names(0, STORES)}
        for checkout, _ in signups.values():
            fleet.post(checkout)
        poll(lambda: fleet.rows("SELECT count(*) FROM instance")[0][0] == STORES, timeout=60,
             what="the checkouts applied")
        for name in names(0, STORES // 2):
            fleet.post(signups[name][1])
        # The first wave's run holds a worker's signups lane: the second wave is the other's.
        poll(lambda: fleet.rows("SELECT count(*) FROM job WHERE kind = 'converge' "
                                "AND state = 'running'")[0][0], timeout=60,
             what="the first wave's converge run")
        for name in names(STORES // 2, STORES - STORES // 2):
            fleet.post(signups[name][1])
        try:
            poll(lambda: live() == STORES, timeout=240, interval=0.5,
                 what=f"{STORES} stores running with their welcome sent")
        except AssertionError as exc:
            states = fleet.rows("SELECT subdomain, status, status_message FROM instance")
            raise AssertionError(f"{exc}\n{states}\n{fleet.logs()}") from None
        took = time.monotonic() - started

        stores = fleet.rows("SELECT id, subdomain FROM instance WHERE live")
        assert sorted(s for _, s in stores) == names(0, STORES)
        # No job ran twice: every job done at its first attempt.
        assert fleet.rows("SELECT kind, state, attempts, count(*) FROM job "
                          "WHERE NOT (state = 'done' AND attempts = 1) "
                          "GROUP BY kind, state, attempts") == []
        # No store provisioned twice: one successful provision run per store, and its one
        # converge job.
        done = fleet.rows("SELECT l.instance, l.ansible_run FROM logentry l "
                          "WHERE l.message LIKE 'provision done%%'")
        assert sorted(i for i, _ in done) == sorted(i for i, _ in stores), done
        converges = Counter(i for (i,) in fleet.rows(
            "SELECT instance FROM job WHERE kind = 'converge'"))
        assert set(converges.values()) == {1}, converges
        runs = fleet.rows("SELECT id, artifact_dir, status FROM ansiblerun "
                          "WHERE playbook LIKE '%%provision%%'")
        assert {status for _, _, status in runs} == {"successful"}, runs
        assert {run for _, run in done} == {run_id for run_id, _, _ in runs}
        # Both workers built stores (each run's artifacts are under its worker's data dir).
        by_worker = Counter(next(str(d) for d in fleet.worker_dirs
                                 if artifact.startswith(str(d))) for _, artifact, _ in runs)
        assert len(by_worker) == 2, f"runs by worker: {by_worker}"
        # One container per store, and one welcome email each.
        containers = docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").split()
        assert sorted(containers) == [f"ebuilder_{n}" for n in names(0, STORES)]
        emails = [message_from_bytes(m) for m in sink.messages]
        welcomed = Counter(e["To"] for e in emails
                           if e["To"].startswith(PREFIX) and "is ready" in e["Subject"])
        assert welcomed == {f"{n}@example.com": 1 for n in names(0, STORES)}, welcomed
        spans = fleet.rows("SELECT r.id, count(l.id), r.finished_at - r.started_at "
                           "FROM ansiblerun r JOIN logentry l ON l.ansible_run = r.id "
                           "AND l.message LIKE 'provision done%%' GROUP BY r.id ORDER BY r.id")
        print(f"{STORES} stores in {took:.1f} s by runs (id, stores, took): {spans}")
    finally:
        fleet.stop()
        found = docker("ps", "-aq", "--filter", label).split()
        if found:
            docker("rm", "-f", *found)
        if made_network:
            docker("network", "rm", network)
