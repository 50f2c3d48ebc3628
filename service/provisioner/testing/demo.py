"""Local end-to-end demo on the embedded defaults.

Starts nginx (own prefix, loopback ports, self-signed wildcard), runs
`provisioner serve` on SQLite with the email outbox, sends it a signed
checkout and the first paid invoice, waits for the store, and says how to
reach it. Ctrl-C (or --exit) stops the service and nginx.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from provisioner.config import PROJECT_DIR
from provisioner.testing import stripe_events
from provisioner.testing.stack import LocalNginx, free_port, wait_for_port

WEBHOOK_SECRET = "whsec_demo_local_only_0123456789"
NETWORK = "ebuilder_demo"
INSTALLATION_ID = "demo-local"


def post_event(url: str, evt: dict) -> float:
    payload = stripe_events.encode(evt)
    request = urllib.request.Request(
        url, data=payload, method="POST",
        headers={"Stripe-Signature": stripe_events.sign(payload, WEBHOOK_SECRET),
                 "Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        json.loads(response.read())
    return time.perf_counter() - started


def wait_for_store(database: Path, subdomain: str, timeout: float) -> dict:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as conn:
            row = conn.execute(
                'SELECT status, status_message, port, welcome_sent_at FROM "Instance" '
                "WHERE subdomain = ?", (subdomain,)).fetchone()
        if row and row[0] in ("failed", "needs_attention"):
            raise SystemExit(f"demo: provisioning failed: {row[1]}")
        if row and row[0] == "running" and row[3]:
            return {"port": row[2]}
        time.sleep(0.2)
    raise SystemExit(f"demo: {subdomain} was not live after {timeout:.0f}s")


def remove_leftovers() -> None:
    """The containers an earlier demo made (by its installation label), nothing else."""
    leftovers = subprocess.run(["docker", "ps", "-aq", "--filter",
                                f"label=ebuilder.installation={INSTALLATION_ID}"],
                               capture_output=True, text=True).stdout.split()
    if leftovers:
        subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subdomain", default="demo-shop")
    parser.add_argument("--email", default="jane@example.com")
    parser.add_argument("--exit", action="store_true", help="stop everything once the store is up")
    args = parser.parse_args(argv)

    root = PROJECT_DIR / ".demo"
    remove_leftovers()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    base_domain = "stores.localhost"
    nginx = LocalNginx(root / "nginx", base_domain=base_domain).start()
    port = free_port()
    env = {
        **os.environ, **nginx.settings(),
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BASE_DOMAIN": base_domain,
        "PROVISIONER_DATA_DIR": str(root / "data"),
        "CUSTOMER_DATA_ROOT": str(root / "customers"),
        "CONTAINER_NETWORK": NETWORK,
        "INSTALLATION_ID": INSTALLATION_ID,
        "PROVISIONER_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "PROVISIONER_ENV_FILE": str(root / "none.env"),
    }
    log = open(root / "service.log", "w")  # noqa: SIM115 (lives as long as the service)
    service = subprocess.Popen(
        [str(Path(sys.executable).parent / "provisioner"), "serve", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30)
        print(f"demo: service on http://127.0.0.1:{port}, nginx on 127.0.0.1:"
              f"{nginx.http_port} (http) / {nginx.https_port} (https)")
        started = time.perf_counter()
        evts = stripe_events.signup(subdomain=args.subdomain, site_name="Jane's Shop",
                                    email=args.email)
        times = [post_event(f"http://127.0.0.1:{port}/api/webhook/stripe/", e) for e in evts]
        print(f"demo: sent signed checkout.session.completed + invoice.paid "
              f"(answered in {max(times) * 1000:.0f} ms)")
        store = wait_for_store(root / "data" / "provisioner.sqlite3", args.subdomain, 300)
        host = f"{args.subdomain}.{base_domain}"
        print(f"demo: store live {time.perf_counter() - started:.1f} s after the webhook\n")
        print(f"  store URL:     https://{host}:{nginx.https_port}/")
        print(f"  through nginx: curl --cacert {nginx.cert} --resolve "
              f"{host}:{nginx.https_port}:127.0.0.1 https://{host}:{nginx.https_port}/health/")
        print(f"  container:     docker ps --filter name=ebuilder_{args.subdomain} "
              f"(127.0.0.1:{store['port']})")
        print(f"  welcome email: {next((root / 'data' / 'outbox').glob('*.eml'))}")
        print(f"  service log:   {root / 'service.log'}")
        print(f"  ansible runs:  {root / 'data' / 'ansible-runs'}\n")
        if not args.exit:
            print("demo: running; Ctrl-C stops the service and nginx")
            service.wait()
    except KeyboardInterrupt:
        pass
    finally:
        service.terminate()
        service.wait(timeout=30)
        nginx.stop()
        log.close()
        # Its files stay in .demo/ to look at; a running store with no nginx is no use.
        remove_leftovers()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
