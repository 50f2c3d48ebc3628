"""Fault injection on real processes (tests/faults/): the service as `provisioner serve`
in a process of its own, so it can be killed; an SMTP server that can go down or hang;
a private Docker engine that can be stopped; a full filesystem; a locked database.

A `Stack` is one test module's world: its own data dir, nginx on loopback ports, SMTP
server, Docker network, store port range and installation id. It removes exactly what
it made: containers and networks labelled with its installation id, processes it
started (by pid), its nginx, its mounts.
"""

from __future__ import annotations

import base64
import contextlib
import email
import errno
import http.client
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email import policy
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import TypeVar

from provisioner.testing import stripe_events
from provisioner.testing.stack import LocalNginx, free_port

WEBHOOK_SECRET = "whsec_faults_" + "f" * 24
ADMIN_PASSWORD = "faults-admin-password"
ADMIN_NOTIFY_EMAIL = "ops@example.com"
BASE_DOMAIN = "faults.test"
BIN_DIR = Path(sys.executable).parent
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
WELCOME_SUBJECT = "is ready"
# How long a case waits for one provisioning run to get somewhere (live, failed, a given
# task): a run takes ~13 s on an idle 2-core machine and several times that when the
# machine is busy with other work.
RUN_DEADLINE = 120
ALERT_PREFIX = "[provisioner]"

T = TypeVar("T")


def poll(condition: Callable[[], T], timeout: float, what: str,
         interval: float = 0.1, explain: Callable[[], str] | None = None) -> T:
    """Poll `condition` until it returns something truthy, or fail naming `what` (and
    what `explain` says about the state things were left in)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f"\n{explain()}" if explain else ""))
        time.sleep(interval)


# -- email ----------------------------------------------------------------------


class _Sink:
    def __init__(self, messages: list[EmailMessage]):
        self.messages = messages

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


class Mailbox:
    """aiosmtpd on a fixed loopback port, which a test can take down and bring back."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.messages: list[EmailMessage] = []
        self._controller = None

    def start(self) -> Mailbox:
        from aiosmtpd.controller import Controller

        if self._controller is None:
            controller = Controller(_Sink(self.messages), hostname="127.0.0.1", port=self.port)
            controller.start()
            self._controller = controller
        return self

    def stop(self) -> None:
        """The port closes: a connection is refused, as with an SMTP server that is down."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def to(self, address: str, subject_has: str = "") -> list[EmailMessage]:
        return [m for m in list(self.messages)
                if address in {a for _, a in getaddresses([str(m["To"])])}
                and subject_has in str(m["Subject"])]

    def welcomes(self, address: str) -> list[EmailMessage]:
        return self.to(address, WELCOME_SUBJECT)

    def alerts(self) -> list[EmailMessage]:
        return [m for m in self.to(ADMIN_NOTIFY_EMAIL)
                if str(m["Subject"]).startswith(ALERT_PREFIX)]


class HungSMTP:
    """An SMTP server stuck after accept: connections open and no greeting ever comes."""

    def __init__(self, port: int = 0):
        self._listener = socket.create_server(("127.0.0.1", port), backlog=64)
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def holding(self) -> int:
        """Connections it holds open (each an SMTP client waiting for a greeting)."""
        return len(self.accepted)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone may not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
        for connection in self.accepted:
            connection.close()


# -- HTTP -----------------------------------------------------------------------


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 presenting (and verifying) the store's host name."""

    def __init__(self, port: int, server_name: str, cafile: Path):
        context = ssl.create_default_context(cafile=str(cafile))
        super().__init__("127.0.0.1", port, context=context, timeout=10)
        self.server_name = server_name

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.server_name)


def through_nginx(nginx: LocalNginx, subdomain: str, path: str = "/health/") -> int:
    """The status nginx answers for the store's host name; 0 if nginx does not answer."""
    host = f"{subdomain}.{nginx.base_domain}"
    connection = _SNIConnection(nginx.https_port, host, nginx.cert)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        connection.close()


class Answer:
    """An HTTP answer whatever its status (urllib raises on 4xx/5xx)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> object:
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


def http_call(method: str, url: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 30) -> Answer:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


# -- processes --------------------------------------------------------------------


def _proc(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Alive and not a zombie."""
    stat = _proc(pid, "stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"


def processes_mentioning(text: str, command: str = "") -> list[int]:
    """Live processes whose command line, working dir or environment mentions `text` (a
    stack's data dir, a run's ident), and whose command line has `command` in it."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        cmdline = _proc(pid, "cmdline")
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
        except OSError:
            cwd = b""
        if (needle in cmdline or needle in cwd or needle in _proc(pid, "environ")) \
                and command.encode() in cmdline and _alive(pid):
            found.append(pid)
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Service:
    """`provisioner serve` in a process and session of its own."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["PROVISIONER_PUBLIC_URL"] = self.url
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> Service:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN_DIR / "provisioner"), "-v", "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"provisioner serve exited with {self.process.returncode}"
                                     f":\n{self.log_tail()}")
            try:
                return http_call("GET", self.url + "/api/health/", timeout=5).status == 200
            except OSError:
                return False
        poll(healthy, timeout, "provisioner serve to answer /api/health/", interval=0.1)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, number: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, number)

    def wait_exit(self, timeout: float) -> float:
        """Seconds until the process exited; fails after `timeout`."""
        assert self.process is not None
        started = time.monotonic()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"provisioner serve still running {timeout:.0f}s later:\n"
                                 f"{self.log_tail()}") from None
        return time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of its whole process group if it does not go."""
        if not self.running():
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- talking to it -------------------------------------------------------

    def api(self, method: str, path: str, body: dict | None = None) -> Answer:
        token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        data = None
        if method == "POST":
            headers["Content-Type"] = "application/json"
            data = json.dumps(body or {}).encode()
        return http_call(method, self.url + path, data, headers)

    def webhook(self, evt: dict, timeout: float = 30) -> Answer:
        """One signed delivery of `evt` (a fresh signature each time, as Stripe does)."""
        payload = stripe_events.encode(evt)
        return http_call("POST", self.url + "/api/webhook/stripe/", payload, {
            "Stripe-Signature": stripe_events.sign(payload, WEBHOOK_SECRET),
            "Content-Type": "application/json"}, timeout=timeout)

    def deliver(self, evts: list[dict]) -> None:
        """Deliver events that must be accepted."""
        for evt in evts:
            answer = self.webhook(evt)
            assert answer.status == 200, f"{evt['type']} answered {answer}"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN_DIR / "provisioner"), *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env)

    def retry(self, store_id: int) -> str:
        """An operator's retry of a failed store: `provisioner retry`, or else (a CLI
        without it) the admin API. Returns which one did it."""
        result = self.cli("retry", str(store_id))
        if result.returncode == 0:
            return "provisioner retry"
        if "invalid choice" not in result.stderr:
            raise AssertionError(f"provisioner retry {store_id} exited {result.returncode}: "
                                 f"{result.stdout}{result.stderr}")
        answer = self.api("POST", f"/api/instances/{store_id}/retry/")
        assert answer.status in (200, 202), f"retry through the admin API: {answer}"
        return "admin API retry"


# -- a test module's world ----------------------------------------------------------


def _port_block(size: int = 20) -> tuple[int, int]:
    """A block of loopback ports for stores, away from other stacks on this machine."""
    for _ in range(50):
        start = random.randrange(20000, 30000 - size, size)
        if all(_port_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise RuntimeError("no free block of store ports")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Stack:
    """One test module's provisioner world (see the module docstring)."""

    def __init__(self, root: Path, name: str, docker_host: str = DEFAULT_ENGINE):
        self.root = root
        self.name = name
        self.docker_host = docker_host
        self.installation_id = f"faults-{name}-{secrets.token_hex(3)}"
        self.network = f"ebf_{name}_{secrets.token_hex(3)}"
        self.data_dir = root / "data"
        self.customers = root / "customers"
        self.nginx = LocalNginx(root / "nginx", base_domain=BASE_DOMAIN)
        self.mailbox = Mailbox()
        self.services: list[Service] = []
        self.mounts: list[Path] = []
        self._signups: dict[str, list[dict]] = {}
        self._ports = _port_block()

    def start(self) -> Stack:
        self.nginx.start()
        self.mailbox.start()
        return self

    def env(self, **overrides: str) -> dict[str, str]:
        """The service's settings: quick retries, small timeouts, this stack's resources."""
        env = {
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            # The code under test, when it is not the installed one (a check of older code).
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
            "PROVISIONER_ENV_FILE": str(self.root / "none.env"),
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "BASE_DOMAIN": BASE_DOMAIN,
            "PROVISIONER_DATA_DIR": str(self.data_dir),
            "CUSTOMER_DATA_ROOT": str(self.customers),
            "BACKUP_ROOT": str(self.root / "backups"),
            "CONTAINER_NETWORK": self.network,
            "INSTALLATION_ID": self.installation_id,
            "PORT_RANGE_START": str(self._ports[0]),
            "PORT_RANGE_END": str(self._ports[1]),
            **self.nginx.settings(),
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(self.mailbox.port),
            "ADMIN_NOTIFY_EMAIL": ADMIN_NOTIFY_EMAIL,
            "PROVISIONER_ADMIN_USER": "admin",
            "PROVISIONER_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "HEALTH_WAIT_SECONDS": "20",
            "JOB_MAX_ATTEMPTS": "6",
            "JOB_RETRY_BASE_SECONDS": "1",
            "SMTP_TIMEOUT_SECONDS": "3",
            "STOP_GRACE_SECONDS": "5",
            "JOB_RUN_TIMEOUT_SECONDS": "180",
            "DB_BUSY_TIMEOUT_SECONDS": "2",
        }
        env.update(overrides)
        return env

    def service(self, **overrides: str) -> Service:
        """A started `provisioner serve` with this stack's settings and `overrides`."""
        service = Service(self.env(**overrides), self.root / "service.log")
        self.services.append(service)
        return service.start()

    # -- facts --------------------------------------------------------------

    @property
    def database(self) -> Path:
        return self.data_dir / "provisioner.sqlite3"

    def rows(self, sql: str, *args: object) -> list[tuple]:
        """A read of the service's database (WAL: readers never wait for its writer). Never
        creates it: that is the service's to do."""
        connection = sqlite3.connect(f"file:{self.database}?mode=rw", uri=True, timeout=10)
        try:
            return connection.execute(sql, args).fetchall()
        finally:
            connection.close()

    def store(self, subdomain: str) -> dict | None:
        found = self.rows('SELECT id, status, status_message, welcome_sent_at, live FROM '
                          '"Instance" WHERE subdomain = ? ORDER BY id', subdomain)
        if not found:
            return None
        assert len(found) == 1, f"{len(found)} store rows for {subdomain}: {found}"
        keys = ("id", "status", "status_message", "welcome_sent_at", "live")
        return dict(zip(keys, found[0], strict=True))

    def runs(self, status: str | None = None) -> list[dict]:
        keys = ("id", "ident", "playbook", "status", "pid")
        sql = 'SELECT id, ident, playbook, status, pid FROM "AnsibleRun"'
        found = self.rows(sql + " WHERE status = ?", status) if status else self.rows(sql)
        return [dict(zip(keys, row, strict=True)) for row in found]

    def welcome_job(self, subdomain: str) -> dict | None:
        """The store's welcome email job: state, attempts, last error."""
        store = self.store(subdomain)
        found = store and self.rows(
            'SELECT state, attempts, last_error FROM "Job" WHERE instance = ? AND kind = ? '
            "AND detail LIKE ? ORDER BY id DESC", store["id"], "notify", "welcome|%")
        return dict(zip(("state", "attempts", "last_error"), found[0], strict=True)) \
            if found else None

    def event_counts(self) -> dict[str, int]:
        return dict(self.rows('SELECT stripe_id, count(*) FROM "StripeEvent" '
                              "GROUP BY stripe_id"))

    def failure_recorded(self, subdomain: str) -> bool:
        """A job of the store failed at least once (its error is kept), or the store did."""
        store = self.store(subdomain)
        return bool(store and (store["status"] == "failed" or self.rows(
            'SELECT id FROM "Job" WHERE instance = ? AND last_error IS NOT NULL '
            "AND kind IN (?, ?)", store["id"], "converge", "action")))

    def errors_of(self, subdomain: str) -> str:
        """Every error recorded about the store: its jobs' and its log's."""
        store = self.store(subdomain)
        if store is None:
            return ""
        errors = [row[0] or "" for row in self.rows(
            'SELECT last_error FROM "Job" WHERE instance = ?', store["id"])]
        errors += [row[0] for row in self.rows(
            'SELECT message FROM "LogEntry" WHERE instance = ? AND level = ?',
            store["id"], "error")]
        return "\n".join([store["status_message"] or "", *errors])

    def containers(self, subdomain: str) -> list[tuple[str, bool]]:
        """Our containers of the store on its engine: (name, running)."""
        out = subprocess.run(
            ["docker", "-H", self.docker_host, "ps", "-a", "--format",
             "{{.Names}} {{.State}}", "--filter",
             f"label=ebuilder.installation={self.installation_id}",
             "--filter", f"label=ebuilder.subdomain={subdomain}"],
            capture_output=True, text=True, check=True).stdout.split("\n")
        pairs = [line.split() for line in out if line.strip()]
        return [(name, state == "running") for name, state in pairs]

    def ansible_playbooks(self) -> list[int]:
        """ansible-playbook processes of this stack's runs (found by its data dir)."""
        return processes_mentioning(str(self.data_dir), "ansible-playbook")

    def processes(self) -> list[int]:
        """Every process of this stack's service and its runs: each has the data dir in
        its command line, working dir or environment."""
        return processes_mentioning(str(self.data_dir))

    def kill_unit(self, service: Service) -> None:
        """SIGKILL the service with every process it started, as systemd (or the OOM
        killer) ends a unit: its runs live in sessions of their own."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        kill_pids(self.processes())

    def signup(self, subdomain: str) -> list[dict]:
        """The signup events of `subdomain`, the same ones each time (Stripe resends them
        unchanged)."""
        if subdomain not in self._signups:
            self._signups[subdomain] = stripe_events.signup(
                subdomain=subdomain, site_name=subdomain.replace("-", " ").title(),
                email=email_of(subdomain))
        return self._signups[subdomain]

    def describe(self, subdomain: str) -> str:
        """The store and its jobs as the DB has them, for a failure message."""
        store = self.store(subdomain)
        if store is None:
            return f"no store {subdomain} in the DB"
        jobs = self.rows('SELECT id, kind, detail, state, attempts, locked_until, last_error '
                         'FROM "Job" WHERE instance = ? ORDER BY id', store["id"])
        return "\n".join([f"store: {store}", *(f"job: {job}" for job in jobs)])

    def failed_for_good(self, subdomain: str) -> bool:
        """Failed (or parked for an admin) with no store job left to try again."""
        store = self.store(subdomain)
        if not store or store["status"] not in ("failed", "needs_attention"):
            return False
        return not self.rows('SELECT id FROM "Job" WHERE instance = ? AND state IN (?, ?) '
                             "AND kind IN (?, ?)", store["id"], "queued", "running",
                             "converge", "action")

    def live(self, subdomain: str) -> bool:
        """Running with its welcome email sent, and answering through nginx."""
        store = self.store(subdomain)
        return bool(store and store["status"] == "running" and store["welcome_sent_at"]
                    and through_nginx(self.nginx, subdomain) == 200)

    def wait_live(self, subdomain: str, timeout: float = RUN_DEADLINE) -> float:
        """Seconds until the store is live; fails early if it ends failed."""
        started = time.monotonic()

        def live() -> bool:
            if self.failed_for_good(subdomain):
                store = self.store(subdomain)
                raise AssertionError(f"{subdomain} is {store['status']}: "
                                     f"{store['status_message']}")
            return self.live(subdomain)
        poll(live, timeout, f"{subdomain} live through nginx with its welcome email sent",
             interval=0.25, explain=lambda: self.describe(subdomain))
        return time.monotonic() - started

    def recover(self, service: Service, subdomain: str, timeout: float = RUN_DEADLINE) -> str:
        """The store goes live by itself (its job retried), or ends failed with a reason
        and an operator's retry brings it live. Returns which of the two happened."""
        def settled() -> str | None:
            if self.live(subdomain):
                return "the worker's own retries"
            return "failed" if self.failed_for_good(subdomain) else None
        how = poll(settled, timeout, f"{subdomain} live or failed", interval=0.25,
                   explain=lambda: self.describe(subdomain))
        if how != "failed":
            return how
        store = self.store(subdomain)
        assert store["status_message"], f"{subdomain} failed without a reason"
        how = service.retry(store["id"])
        self.wait_live(subdomain, timeout)
        return how

    def wait_run(self, timeout: float = RUN_DEADLINE, playbook: str = "provision.yml") -> dict:
        """The first `running` AnsibleRun of `playbook` whose ansible-playbook has started."""
        def started() -> dict | None:
            return next((r for r in self.runs("running") if r["playbook"] == playbook
                         and (r["pid"] or processes_mentioning(r["ident"], "ansible-playbook"))),
                        None)
        return poll(started, timeout, f"a running {playbook} with its ansible-playbook",
                    interval=0.05)

    def assert_end_state(self, subdomain: str) -> None:
        """Live through nginx, one container, one welcome email, no run left running."""
        assert self.live(subdomain), self.store(subdomain)
        containers = self.containers(subdomain)
        assert [running for _, running in containers] == [True], containers
        welcomes = self.mailbox.welcomes(email_of(subdomain))
        assert len(welcomes) == 1, [str(m["Subject"]) for m in welcomes]
        assert not self.runs("running"), self.runs("running")
        counts = self.event_counts()
        for evt in self.signup(subdomain):
            assert counts.get(evt["id"]) == 1, (evt["type"], counts.get(evt["id"]))

    # -- teardown -------------------------------------------------------------

    def mount_tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True, capture_output=True)
        self.mounts.append(path)
        return path

    def close(self) -> None:
        for service in self.services:
            service.stop()
        kill_pids(self.processes())  # whatever a killed service's runs left
        for kind, ids in (("container", ["ps", "-aq"]), ("network", ["network", "ls", "-q"])):
            found = subprocess.run(
                ["docker", "-H", self.docker_host, *ids, "--filter",
                 f"label=ebuilder.installation={self.installation_id}"],
                capture_output=True, text=True).stdout.split()
            if found:
                remove = ["rm", "-f"] if kind == "container" else ["network", "rm"]
                subprocess.run(["docker", "-H", self.docker_host, *remove, *found],
                               capture_output=True)
        self.nginx.stop()
        self.mailbox.stop()
        for path in reversed(self.mounts):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
        # Root-owned store dirs (made by the playbooks) would outlive pytest's tmp cleanup.
        shutil.rmtree(self.customers, ignore_errors=True)


def email_of(subdomain: str) -> str:
    return f"{subdomain}@example.com"


# -- a full filesystem ----------------------------------------------------------------


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to its last byte; delete the file to free it."""
    filler = directory / ".filler"
    chunk = 1 << 20
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while chunk >= 512:
            try:
                if os.write(fd, b"\0" * chunk) < chunk:
                    chunk //= 4
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 4
    finally:
        os.close(fd)
    return filler


# -- a locked database ---------------------------------------------------------------

_LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("COMMIT")
print("released", flush=True)
"""


@contextlib.contextmanager
def database_locked(database: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the SQLite write lock (BEGIN IMMEDIATE) until the block ends."""
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(database)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked", "the locker could not lock"
        yield locker
    finally:
        with contextlib.suppress(BrokenPipeError):
            locker.stdin.write("\n")
            locker.stdin.flush()
        try:
            locker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            locker.kill()
            locker.wait()


# -- a Docker engine of our own -----------------------------------------------------


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _restore_docker0() -> None:
    """A dockerd restarted on its own data root deletes the host's docker0 (Debian's
    docker.io 20.10), which belongs to the machine's engine: put it back as that
    engine configured it, so nothing outside this test notices."""
    config = json.loads(subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
        check=True, capture_output=True, text=True).stdout)[0]
    subnet = ipaddress.ip_network(config["Subnet"])
    # An engine that chose its own gateway records none: it is the subnet's first address.
    gateway = config.get("Gateway") or str(next(subnet.hosts()))
    address = f"{gateway}/{subnet.prefixlen}"
    for command in (["ip", "link", "add", "docker0", "type", "bridge"],
                    ["ip", "addr", "add", address, "dev", "docker0"],
                    ["ip", "link", "set", "docker0", "up"]):
        subprocess.run(command, check=True, capture_output=True)


class PrivateEngine:
    """A dockerd of the test's own (socket, data root, exec root, pid file, bridge and
    address pool), which it may stop and start; started with the store image loaded."""

    def __init__(self, name: str = "ebfaults", subnet: str = "10.213"):
        self.root = Path(f"/run/{name}-engine")
        self.data_root = Path(f"/var/lib/{name}-engine")
        self.bridge = f"{name}-br0"[:15]
        self.subnet = subnet
        self.url = f"unix://{self.root}/docker.sock"
        self.daemon: subprocess.Popen | None = None
        self._log = None

    def _bridge(self) -> None:
        # Its own default bridge: with --bridge=none dockerd would delete docker0.
        if subprocess.run(["ip", "link", "show", self.bridge],
                          capture_output=True).returncode == 0:
            return
        for command in (["ip", "link", "add", self.bridge, "type", "bridge"],
                        ["ip", "addr", "add", f"{self.subnet}.255.1/24", "dev", self.bridge],
                        ["ip", "link", "set", self.bridge, "up"]):
            subprocess.run(command, check=True, capture_output=True)

    def answers(self) -> bool:
        return subprocess.run(["docker", "-H", self.url, "info"],
                              capture_output=True).returncode == 0

    def _leftover_daemon(self) -> int | None:
        """A dockerd an interrupted earlier run left on our socket, if one still lives."""
        try:
            pid = int((self.root / "docker.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and b"dockerd" in _proc(pid, "cmdline") else None

    def clear_leftovers(self) -> None:
        """What an interrupted earlier run left (data root, exec root, bridge) goes; a
        dockerd of it that still lives is not ours to kill here: say so."""
        leftover = self._leftover_daemon()
        if leftover is not None:
            raise AssertionError(f"a dockerd (pid {leftover}) of an interrupted earlier run "
                                 f"still uses {self.root}: stop it, then run again")
        shutil.rmtree(self.data_root, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)

    def start(self, timeout: float = 60) -> PrivateEngine:
        self.root.mkdir(parents=True, exist_ok=True)
        self._bridge()
        had_docker0 = _link_exists("docker0")
        self._log = open(self.root / "dockerd.log", "a")  # noqa: SIM115 (the daemon's life)
        self.daemon = subprocess.Popen(
            ["dockerd", "--host", self.url, "--data-root", str(self.data_root),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--bridge", self.bridge, "--iptables=false", "--ip-masq=false",
             "--default-address-pool", f"base={self.subnet}.0.0/17,size=24"],
            stdout=self._log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.daemon.poll() is not None:
                raise AssertionError("private dockerd exited:\n"
                                     + (self.root / "dockerd.log").read_text()[-3000:])
            return self.answers()
        poll(up, timeout, "the private dockerd to answer", interval=0.2)
        if had_docker0 and not _link_exists("docker0"):
            _restore_docker0()
        return self

    def load_image(self, image: str) -> None:
        if subprocess.run(["docker", "-H", self.url, "image", "inspect", image],
                          capture_output=True).returncode == 0:
            return
        saved = subprocess.run(["docker", "save", image], check=True,
                               capture_output=True).stdout
        subprocess.run(["docker", "-H", self.url, "load"], input=saved, check=True,
                       capture_output=True)

    def stop(self, timeout: float = 60) -> None:
        """dockerd stopped as systemd does (SIGTERM): its containers stop with it."""
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def remove(self) -> None:
        """Stop it and remove everything it had: its containers, data, bridge."""
        if self.daemon is not None and self.daemon.poll() is None:
            leftovers = subprocess.run(["docker", "-H", self.url, "ps", "-aq"],
                                       capture_output=True, text=True).stdout.split()
            if leftovers:
                subprocess.run(["docker", "-H", self.url, "rm", "-f", *leftovers],
                               capture_output=True)
        self.stop()
        shutil.rmtree(self.data_root, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)

    def inventory(self, path: Path) -> Path:
        path.write_text(
            "docker_hosts:\n"
            "  hosts:\n"
            "    private-engine:\n"
            "      ansible_connection: local\n"
            "      ansible_python_interpreter: '{{ ansible_playbook_python }}'\n"
            f"      ebuilder_instance_docker_host: {self.url}\n"
            "stores:\n"
            "  hosts: {}\n")
        return path


# -- nginx ------------------------------------------------------------------------

_NGINX_WRAPPER = """#!/bin/sh
# nginx, except that while {flag} exists{also} a call with "{match}" in its
# arguments waits (and says so with {flag}.waiting): a hung playbook task.
case " $* " in
  *"{match}"*)
    while [ -e "{flag}" ]{condition}; do touch "{flag}.waiting"; sleep 0.1; done ;;
esac
exec {nginx} "$@"
"""


def hanging_nginx(path: Path, flag: Path, match: str = "", nginx: str = "nginx",
                  when_exists: Path | None = None) -> Path:
    """An NGINX_BIN that hangs while `flag` (and `when_exists`, if given) exists, on calls
    whose arguments have `match` (every call when empty)."""
    path.write_text(_NGINX_WRAPPER.format(
        flag=flag, match=match, nginx=shutil.which(nginx) or nginx,
        also=f" and so does {when_exists}" if when_exists else "",
        condition=f' && [ -e "{when_exists}" ]' if when_exists else ""))
    path.chmod(0o755)
    return path


def start_nginx(nginx: LocalNginx) -> None:
    """Start a stopped LocalNginx again, with its configuration as it is."""
    subprocess.run([nginx.nginx_bin, "-c", str(nginx.conf), "-e", str(nginx.root / "error.log")],
                   check=True, capture_output=True)
    poll(nginx.running, 10, "nginx to start")


def stop_nginx(nginx: LocalNginx) -> None:
    nginx.stop()
    poll(lambda: not nginx.running(), 10, "nginx to stop")
    wait_for_port_closed(nginx.https_port)


def wait_for_port_closed(port: int, timeout: float = 10) -> None:
    poll(lambda: _port_free(port), timeout, f"127.0.0.1:{port} to close")


def live_processes(*needles: bytes) -> list[int]:
    """Live (not zombie) processes whose command line holds every needle."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and all(needle in cmdline for needle in needles):
            found.append(int(proc.name))
    return found
