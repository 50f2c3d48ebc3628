"""Real parts: the Docker engine, nginx on loopback ports, an SMTP server, the service over HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cheroot import wsgi
from pony.orm import db_session

from provisioner.config import load_config
from provisioner.testing import stripe_events
from provisioner.testing.stack import LocalNginx, free_port, wait_for_port
from provisioner.web import create_app
from provisioner.worker import Pause, serve_worker
from tests.conftest import WEBHOOK_SECRET

pytestmark = pytest.mark.integration
ADMIN_PASSWORD = "admin-secret-for-tests"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def poll(condition, timeout: float = 120, interval: float = 0.1, what: str = "condition"):
    """Poll `condition` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def inspect(name: str) -> dict:
    return json.loads(docker("inspect", name))[0]


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 while presenting (and verifying) another host name."""

    def __init__(self, port: int, server_name: str, cafile: Path):
        context = ssl.create_default_context(cafile=str(cafile))
        super().__init__("127.0.0.1", port, context=context, timeout=10)
        self.server_name = server_name

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.server_name)


def https_request(nginx: LocalNginx, host: str, path: str, method: str = "GET",
                  body: bytes | None = None) -> tuple[int, bytes]:
    conn = _SNIConnection(nginx.https_port, host, nginx.cert)
    headers = {"Host": host}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class SMTPSink:
    def __init__(self):
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append(envelope.content)
        return "250 OK"


@dataclass
class Service:
    url: str
    config: object
    nginx: LocalNginx
    smtp: SMTPSink
    wake_event: threading.Event
    paused: Pause
    env: dict
    webhook_times: list[float] = field(default_factory=list)

    def api(self, method: str, path: str) -> tuple[int, object]:
        """An admin API call over HTTP (POSTs as JSON, as the API requires)."""
        token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        if method == "POST":
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, method=method, headers=headers,
                                         data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        try:
            return status, json.loads(body)
        except json.JSONDecodeError:
            return status, body.decode()

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the `provisioner` command with the service's settings."""
        bin_dir = Path(sys.executable).parent
        return subprocess.run([str(bin_dir / "provisioner"), *args], capture_output=True,
                              text=True, timeout=600,
                              env={**self.env, **(env or {}),
                                   "PATH": f"{bin_dir}:{self.env.get('PATH', '')}"})

    def wake(self) -> None:
        """Tell the worker there is work (as the webhook does)."""
        self.wake_event.set()

    def post_event(self, evt: dict) -> dict:
        payload = stripe_events.encode(evt)
        request = urllib.request.Request(
            self.url + "/api/webhook/stripe/", data=payload, method="POST",
            headers={"Stripe-Signature": stripe_events.sign(payload, WEBHOOK_SECRET),
                     "Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as response:
            self.webhook_times.append(time.perf_counter() - started)
            assert response.status == 200
            return json.loads(response.read())


@pytest.fixture(scope="session")
def engine():
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine answers: run scripts/setup.sh first")
    docker("image", "inspect", "ebuilder-standin:latest")


@pytest.fixture(scope="session")
def nginx(tmp_path_factory, engine):
    server = LocalNginx(tmp_path_factory.mktemp("nginx"), base_domain="stores.test").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smtp():
    sink = SMTPSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield sink, controller.port
    controller.stop()


@pytest.fixture(scope="session")
def localstripe():
    """localstripe (PyPI), a Stripe fake that speaks the API and signs its webhooks."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "localstripe"), "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def live_config(live_env, tmp_path_factory):
    return load_config(live_env, env_file=tmp_path_factory.mktemp("noenv2") / ".env")


# The live service's plans (tests/integration/test_plans_live.py); the first is what a
# checkout without a plan gets.
LIVE_PLANS = """
[[plan]]
key = "starter"
name = "Starter"
price_id = "price_starter"
price_pence = 1200
memory_mb = 256
cpus = 0.5
pids_limit = 128
disk_mb = 1024

[[plan]]
key = "pro"
name = "Pro"
price_id = "price_pro"
price_pence = 2900
memory_mb = 512
cpus = 1
pids_limit = 256
disk_mb = 2048
trial_days = 14

[[plan]]
key = "tiny"
name = "Tiny"
price_id = "price_tiny"
price_pence = 500
memory_mb = 192
cpus = 0.25
pids_limit = 64
disk_mb = 1
"""


@pytest.fixture(scope="session")
def live_env(base_env, config, nginx, smtp, localstripe, tmp_path_factory):
    """The settings of the live service, also given to CLI subprocesses."""
    plans_file = tmp_path_factory.mktemp("plans") / "plans.toml"
    plans_file.write_text(LIVE_PLANS)
    return {**base_env, **nginx.settings(),
           "PLANS_FILE": str(plans_file),
           "ADMIN_NOTIFY_EMAIL": "ops@example.com",
           "HEALTH_WAIT_SECONDS": "15",
           "STRIPE_SECRET_KEY": "sk_test_localstripe", "STRIPE_API_BASE": localstripe,
           "PROVISIONER_ADMIN_USER": "admin", "PROVISIONER_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "CUSTOMER_DATA_ROOT": str(tmp_path_factory.mktemp("customers")),
           "CONTAINER_NETWORK": "ebuilder_test",
           "BACKUP_ROOT": str(tmp_path_factory.mktemp("backups") / "archives"),
           "BACKUP_COPY_TO": str(tmp_path_factory.mktemp("backup-copies")),
           "JOB_MAX_ATTEMPTS": "2",
           "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(smtp[1]),
           "PROVISIONER_ENV_FILE": str(tmp_path_factory.mktemp("noenv3") / ".env")}


@pytest.fixture(scope="session")
def service(live_config, live_env, nginx, smtp):
    stop, wake, paused = threading.Event(), threading.Event(), Pause()
    worker = serve_worker(live_config, stop, wake, paused)
    port = free_port()
    server = wsgi.Server(("127.0.0.1", port), create_app(live_config, wake=wake), numthreads=4)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    wait_for_port(port)
    yield Service(f"http://127.0.0.1:{port}", live_config, nginx, smtp[0], wake, paused,
                  live_env)
    server.stop()
    stop.set()
    worker.join(timeout=60)


@pytest.fixture(autouse=True)
def clean_stack(request):
    """Each test starts with no stores: the DB is emptied, so are Docker, nginx and the data."""
    yield
    if "live_config" not in request.fixturenames:
        return
    live_config = request.getfixturevalue("live_config")
    nginx = request.getfixturevalue("nginx")
    # Only what this test run made (its installation id): the engine may be shared.
    names = subprocess.run(["docker", "ps", "-aq", "--filter",
                            f"label=ebuilder.installation={live_config.installation_id}"],
                           capture_output=True, text=True).stdout.split()
    if names:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
    for vhost in nginx.sites.glob("*"):
        vhost.unlink()
    for data in live_config.customer_data_root.glob("*"):
        shutil.rmtree(data)


def wait_until_live(subdomain: str, timeout: float = 180):
    from provisioner.models import Instance

    def live():
        with db_session:
            instance = Instance.get(subdomain=subdomain, live=True)
            if instance is not None and instance.status == "failed":
                raise AssertionError(f"{subdomain} failed: {instance.status_message}")
            return instance is not None and instance.status == "running" and \
                instance.welcome_sent_at is not None
    poll(live, timeout=timeout, what=f"{subdomain} running with its welcome email sent")


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium, driven by Playwright."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run scripts/setup.sh")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()
