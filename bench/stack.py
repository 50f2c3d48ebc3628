"""The throwaway provisioner every figure runs against, and the helpers they share.

One `BenchStack` per run: a work dir, nginx on two loopback ports
(`provisioner.testing.stack.LocalNginx`), `provisioner serve` as a subprocess (its
worker running), the floor app (`bench.floor_app`) as another, and this process bound
to the service's database (to build the fleet and read what the service did). Every
container and network it makes carries the run's installation id; `close` stops the
processes it started (by pid), then removes exactly those containers and networks,
also after Ctrl-C or a failure.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from provisioner.testing import faults
from provisioner.testing.stack import LocalNginx, free_port

BASE_DOMAIN = "bench.test"
IMAGE = "ebuilder-standin:latest"
ADMIN_USER = "admin"
# The ports stores get (below Linux's ephemeral range, away from the tests' 19100-19199).
PORT_RANGE = (23000, 24999)
VENV_BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    """The benchmark itself broke (not a goal missed): exit non-zero."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def poll(condition: Callable[[], object], timeout: float, what: str,
         interval: float = 0.05):
    """The fault suite's poll, failing with a BenchError (the bench broke, exit 1)."""
    try:
        return faults.poll(condition, timeout, what, interval)
    except AssertionError as exc:
        raise BenchError(str(exc)) from None


@dataclass
class Timed:
    """A `provisioner <command>` run: its wall time, the time its summary line gives."""

    wall: float
    inner: float
    summary: str


def timed_command(stack: BenchStack, command: str, summary: re.Pattern, timeout: float) -> Timed:
    """Run `provisioner <command>`; its summary line's last group is its own seconds."""
    started = time.perf_counter()
    result = run([str(VENV_BIN / "provisioner"), command, "--timeout", str(timeout)],
                 timeout=timeout, check=False, env=stack.env())
    wall = time.perf_counter() - started
    match = summary.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise BenchError(f"provisioner {command} failed (rc {result.returncode}): "
                         f"{(result.stdout + result.stderr).strip()[-1500:]}")
    return Timed(wall, float(match.group(match.re.groups)), match.group(0))


def run(argv: list[str], timeout: float = 600, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} failed (rc {result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-800:]}")
    return result


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to nginx on 127.0.0.1 presenting a store's name (SNI and Host)."""

    _context = ssl.create_default_context()
    _context.check_hostname = False
    _context.verify_mode = ssl.CERT_NONE

    def __init__(self, port: int, server_name: str, timeout: float):
        super().__init__("127.0.0.1", port, context=self._context, timeout=timeout)
        self.server_name = server_name

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.server_name)


def store_status(https_port: int, subdomain: str, path: str = "/health/",
                 timeout: float = 5) -> int | None:
    """A store's answer through nginx over TLS with its Host header; None: no answer."""
    host = f"{subdomain}.{BASE_DOMAIN}"
    conn = _SNIConnection(https_port, host, timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class PortPool:
    """Loopback ports for stores: in the service's range, not a live store's, bindable."""

    def __init__(self, first: int, last: int):
        self.next, self.last = first, last

    def take(self, used: set[int]) -> int:
        while self.next <= self.last:
            port, self.next = self.next, self.next + 1
            if port in used:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise BenchError(f"no free port left in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


class BenchStack:
    def __init__(self, keep: bool = False, forks: int | None = None):
        self.keep = keep
        self.forks = forks
        token = secrets.token_hex(3)
        self.installation_id = f"bench-{token}"
        # Every subdomain of this run starts with it: container names are engine-wide.
        self.prefix = f"b{token}"
        self.webhook_secret = f"whsec_bench_{secrets.token_hex(12)}"
        self.admin_password = secrets.token_urlsafe(12)
        self.work = Path(tempfile.mkdtemp(prefix="ebuilder-bench-"))
        self.nginx = LocalNginx(self.work / "nginx", base_domain=BASE_DOMAIN)
        self.service_port = free_port()
        self.floor_port = free_port()
        self.service: subprocess.Popen | None = None
        self.floor: subprocess.Popen | None = None
        self._logs: list = []
        self.config = None
        self.ports = PortPool(*PORT_RANGE)

    # -- settings --------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    @property
    def database(self) -> Path:
        return self.data_dir / "provisioner.sqlite3"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    def settings(self) -> dict[str, str]:
        """The service's settings (also the CLI's and this process's)."""
        # Nothing scheduled may run during the measurements: the first sweep, sync and
        # cleanup are hours away; the figures queue their own.
        cleanup_at = (datetime.now() - timedelta(hours=1)).strftime("%H:%M")
        return {
            **self.nginx.settings(),
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "BASE_DOMAIN": BASE_DOMAIN,
            "PROVISIONER_DATA_DIR": str(self.data_dir),
            "CUSTOMER_DATA_ROOT": str(self.work / "customers"),
            "BACKUP_ROOT": str(self.work / "backups"),
            "CONTAINER_NETWORK": f"ebuilder_{self.installation_id}",
            "INSTALLATION_ID": self.installation_id,
            "EBUILDER_IMAGE": IMAGE,
            "PORT_RANGE_START": str(PORT_RANGE[0]),
            "PORT_RANGE_END": str(PORT_RANGE[1]),
            "MAX_STORES_PER_HOST": "100000",
            "HEALTH_INTERVAL_MINUTES": "1440",
            "SYNC_INTERVAL_MINUTES": "10080",
            "CLEANUP_AT": cleanup_at,
            "STOP_GRACE_SECONDS": "5",
            "PROVISIONER_ADMIN_USER": ADMIN_USER,
            "PROVISIONER_ADMIN_PASSWORD": self.admin_password,
            "PROVISIONER_PUBLIC_URL": self.service_url,
            "PROVISIONER_ENV_FILE": str(self.work / "none.env"),
            **({"ANSIBLE_FORKS": str(self.forks)} if self.forks else {}),
        }

    def env(self) -> dict[str, str]:
        """A subprocess's environment: the settings and a minimal rest (nothing of the
        caller's shell that the service would read as a setting)."""
        keep = {k: v for k, v in os.environ.items()
                if k in ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")}
        return {**keep, **self.settings(),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}

    # -- start and stop --------------------------------------------------------

    def start(self) -> BenchStack:
        from provisioner import models
        from provisioner.config import load_config

        log(f"work dir {self.work}, installation id {self.installation_id}")
        self.nginx.start()
        self.config = models.open_database(load_config(self.settings(),
                                                      env_file=self.work / "none.env"))
        self.service = self._spawn("service", [str(VENV_BIN / "provisioner"), "serve",
                                               "--host", "127.0.0.1",
                                               "--port", str(self.service_port)])
        self.floor = self._spawn("floor", [sys.executable, "-m", "bench.floor_app",
                                           "--port", str(self.floor_port),
                                           "--database", str(self.database),
                                           "--threads", str(self.config.server_threads)])
        for name, process, port in (("service", self.service, self.service_port),
                                    ("floor app", self.floor, self.floor_port)):
            poll(lambda p=process, n=port: self._listening(p, n), 60,
                 f"the {name} to listen on 127.0.0.1:{port}")
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.work / f"{name}.log", "w")  # noqa: SIM115 (closed in close())
        self._logs.append(out)
        # Its own session: a Ctrl-C reaches this process only, which stops it in order.
        return subprocess.Popen(argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1],
                                start_new_session=True)

    def _listening(self, process: subprocess.Popen, port: int) -> bool:
        if process.poll() is not None:
            raise BenchError(f"{process.args[1]} exited with {process.returncode} before "
                             f"listening: {self.log_tail(process)}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def wait_idle(self, timeout: float, what: str = "the job queue to drain") -> float:
        """Until the worker has nothing due or running; the seconds it took."""
        from pony.orm import db_session, select

        from provisioner.models import Job, utcnow

        def idle() -> bool:
            self.check_service()
            with db_session:
                now = utcnow()
                return not select(j for j in Job if j.state == "running" or (
                    j.state == "queued" and j.next_run_at <= now)).exists()
        started = time.perf_counter()
        poll(idle, timeout, what, interval=0.2)
        return time.perf_counter() - started

    def log_tail(self, process: subprocess.Popen | None = None, lines: int = 15) -> str:
        name = "service" if process is None or process is self.service else "floor"
        path = self.work / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_service(self) -> None:
        if self.service is not None and self.service.poll() is not None:
            raise BenchError(f"the service exited with {self.service.returncode}:\n"
                             f"{self.log_tail()}")

    def close(self) -> None:
        """Stop what this run started and remove what it made. Safe to call twice."""
        for process in (self.service, self.floor):
            _stop(process)
        self.service = self.floor = None
        # ansible-playbook runs in sessions of its own: end any run of ours still alive
        # (found by its run dir on the command line, as the service itself does).
        from provisioner.ansible.runner import end_run_processes

        runs = self.data_dir / "ansible-runs"
        for run_dir in runs.iterdir() if runs.is_dir() else ():
            end_run_processes(run_dir.name, grace=2)
        label = f"label=ebuilder.installation={self.installation_id}"
        ids = run(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()
        if ids:
            run(["docker", "rm", "-f", *ids], check=False, timeout=900)
        networks = run(["docker", "network", "ls", "-q", "--filter", label],
                       check=False).stdout.split()
        if networks:
            run(["docker", "network", "rm", *networks], check=False)
        self.nginx.stop()
        for out in self._logs:
            out.close()
        self._logs = []
        if self.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def _stop(process: subprocess.Popen | None, grace: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

