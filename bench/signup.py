"""Signup to live store: the webhooks posted to the service until the store's /health/
answers 200 through nginx (TLS, its Host header); one signup and bursts of N.

The floor does the same work by hand, at once: `docker run` of the same image (data
dirs bind-mounted, port published on loopback, labelled with the run's installation
id), a vhost like the role's, one `nginx -s reload`, polling /health/ through nginx.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pony.orm import db_session

from bench.load import post
from bench.stack import (
    BASE_DOMAIN,
    IMAGE,
    BenchError,
    BenchStack,
    free_port,
    poll,
    run,
    store_status,
)
from provisioner.models import AnsibleRun, Instance
from provisioner.testing import stripe_events

LIVE_TIMEOUT = 600
POLL_INTERVAL = 0.05

FLOOR_VHOST = """\
# bench floor vhost
server {{
    listen {http};
    server_name {fqdn};
    return 301 https://$host$request_uri;
}}
server {{
    listen {https} ssl;
    server_name {fqdn};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 100m;
    location / {{
        proxy_pass http://127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_read_timeout 120s;
    }}
}}
"""


# -- the provisioner ------------------------------------------------------------

def _post_signup(stack: BenchStack, subdomain: str) -> None:
    for evt in stripe_events.signup(subdomain=subdomain, site_name=f"Bench {subdomain}",
                                    email=f"{subdomain}@example.com"):
        payload = stripe_events.encode(evt)
        status = post(stack.service_port, "/api/webhook/stripe/", payload,
                      {"Stripe-Signature": stripe_events.sign(payload, stack.webhook_secret),
                       "Content-Type": "application/json"})
        if status != 200:
            raise BenchError(f"the webhook for {subdomain} answered {status}")


def _failed(subdomains: list[str]) -> str | None:
    with db_session:
        for instance in Instance.select(lambda i: i.subdomain in subdomains and i.live):
            if instance.status in ("failed", "needs_attention"):
                return f"{instance.subdomain} {instance.status}: {instance.status_message}"
    return None


def wait_live(stack: BenchStack, subdomains: list[str], timeout: float = LIVE_TIMEOUT) -> None:
    """Until every store answers 200 through nginx; a failed store or service breaks it."""
    waiting = set(subdomains)
    last_db_check = 0.0

    def all_live() -> bool:
        nonlocal last_db_check
        for subdomain in list(waiting):
            if store_status(stack.nginx.https_port, subdomain) == 200:
                waiting.discard(subdomain)
        if waiting and time.monotonic() - last_db_check > 1:
            last_db_check = time.monotonic()
            stack.check_service()
            failure = _failed(list(waiting))
            if failure:
                raise BenchError(f"a store never went live: {failure}")
        return not waiting

    poll(all_live, timeout, f"{len(subdomains)} store(s) to go live "
                            f"(still waiting: {sorted(waiting)[:5]})", POLL_INTERVAL)


def provision_runs() -> int:
    with db_session:
        return AnsibleRun.select(lambda r: r.playbook == "provision.yml").count()


def signups(stack: BenchStack, subdomains: list[str]) -> float:
    """Seconds from the first webhook posted to every store live through nginx."""
    started = time.perf_counter()
    for subdomain in subdomains:
        _post_signup(stack, subdomain)
    wait_live(stack, subdomains)
    return time.perf_counter() - started


# -- the floor ------------------------------------------------------------------

class Floor:
    """Stores made by hand: container, vhost, reload. Removed again by `clear`."""

    def __init__(self, stack: BenchStack):
        self.stack = stack
        self.made: list[tuple[str, Path]] = []

    def _container(self, subdomain: str, port: int) -> None:
        data = self.stack.work / "floor-data" / subdomain
        for part in ("db", "media", "logs"):
            (data / part).mkdir(parents=True, exist_ok=True)
        fqdn = f"{subdomain}.{BASE_DOMAIN}"
        run(["docker", "run", "-d", "--name", f"ebuilder_{subdomain}",
             "--label", f"ebuilder.installation={self.stack.installation_id}",
             "--label", "ebuilder.bench=floor",
             "-p", f"127.0.0.1:{port}:8000",
             "-e", f"SECRET_KEY={secrets.token_urlsafe(32)}",
             "-e", f"ALLOWED_HOSTS={fqdn},127.0.0.1,localhost",
             "-e", f"SITE_NAME=Floor {subdomain}", "-e", f"ADMIN_EMAIL={subdomain}@example.com",
             "-e", f"ADMIN_PASSWORD={secrets.token_urlsafe(12)}",
             "-v", f"{data}/db:/app/db", "-v", f"{data}/media:/app/media",
             "-v", f"{data}/logs:/app/logs", IMAGE], timeout=300)

    def _vhost(self, subdomain: str, port: int) -> Path:
        nginx = self.stack.nginx
        path = nginx.sites / f"zz-floor-{subdomain}.conf"
        path.write_text(FLOOR_VHOST.format(
            http=f"127.0.0.1:{nginx.http_port}", https=f"127.0.0.1:{nginx.https_port}",
            fqdn=f"{subdomain}.{BASE_DOMAIN}", cert=nginx.cert, key=nginx.key, port=port))
        return path

    def reload(self) -> None:
        nginx = self.stack.nginx
        run([nginx.nginx_bin, "-c", str(nginx.conf), "-e", str(nginx.root / "error.log"),
             "-s", "reload"])

    def stores(self, subdomains: list[str]) -> float:
        """Seconds for N stores by hand: parallel docker runs, N vhosts, one reload, poll."""
        # Ports the kernel hands out (outside the stores' range), distinct.
        ports: list[int] = []
        while len(ports) < len(subdomains):
            port = free_port()
            if port not in ports:
                ports.append(port)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(32, len(subdomains))) as pool:
            list(pool.map(self._container, subdomains, ports))
        for subdomain, port in zip(subdomains, ports, strict=True):
            self.made.append((subdomain, self._vhost(subdomain, port)))
        self.reload()
        wait_live(self.stack, subdomains)
        return time.perf_counter() - started

    def clear(self) -> None:
        if not self.made:
            return
        run(["docker", "rm", "-f", *[f"ebuilder_{s}" for s, _ in self.made]], timeout=600)
        for _, vhost in self.made:
            vhost.unlink(missing_ok=True)
        self.made = []
        self.reload()


def floor_stores(stack: BenchStack, prefix: str, count: int, reps: int) -> list[float]:
    floor = Floor(stack)
    times = []
    try:
        for rep in range(reps):
            times.append(floor.stores([f"{prefix}{rep}x{n}" for n in range(count)]))
            floor.clear()
    finally:
        floor.clear()
    return times
