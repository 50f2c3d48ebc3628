"""Benchmark: webhook latency while the worker runs a real health sweep, beside the same
webhooks with the worker idle, in one run.

The webhook path is one insert; no transaction may be held across a playbook
run, so the sweep should barely move its tail. On real Docker and a private
nginx (loopback ports), with the service in this process:

    .venv/bin/python bench/webhook_during_sweep.py --stores 3 --rate 20

Prints p50/p99/max of both phases and the p99 ratio. Needs the stand-in image
(scripts/setup.sh builds it). Removes what it made (containers by its label).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request

from cheroot import wsgi
from pony.orm import db_session

from provisioner import jobs
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import of_instance
from provisioner.models import AnsibleRun, Instance, utcnow
from provisioner.states import JobKind
from provisioner.testing import stripe_events
from provisioner.testing.stack import free_port, local_stack, wait_for_port
from provisioner.web import create_app
from provisioner.worker import Worker

SECRET = "whsec_bench_webhooks"
INSTALLATION = "bench-sweep"


def post_webhook(url: str) -> float:
    evt = stripe_events.event("customer.created", stripe_events.resource("customer"))
    payload = stripe_events.encode(evt)
    request = urllib.request.Request(url, data=payload, method="POST", headers={
        "Stripe-Signature": stripe_events.sign(payload, SECRET)})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    return time.perf_counter() - started


def post_while(url: str, rate: float, keep_going) -> list[float]:
    times = []
    while keep_going():
        started = time.perf_counter()
        times.append(post_webhook(url))
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
    return times


def describe(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"n={len(times)} p50 {statistics.median(times) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"), p99


def make_stores(config, count: int) -> None:
    with db_session:
        for n in range(count):
            Instance(subdomain=f"sweep-{n}", site_name=f"Sweep {n}",
                     admin_email=f"sweep{n}@example.com", port=19400 + n, status="running",
                     desired_state="running", provisioned_at=utcnow())
    with db_session:
        stores = [of_instance(i) for i in Instance.select()]
    result = operations.run(config, Operation.PROVISION, stores,
                            secrets={s.name: {"admin_password": "bench-pw"} for s in stores})
    assert all(h.ok for h in result.hosts.values()), result.hosts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20, help="webhooks per second")
    parser.add_argument("--idle-seconds", type=float, default=5)
    args = parser.parse_args()
    with local_stack(INSTALLATION, SECRET) as config:
        make_stores(config, args.stores)
        port = free_port()
        server = wsgi.Server(("127.0.0.1", port), create_app(config), numthreads=8)
        threading.Thread(target=server.start, daemon=True).start()
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/api/webhook/stripe/"
        stop, wake = threading.Event(), threading.Event()
        threading.Thread(target=Worker(config, wake).run_forever, args=(stop,),
                         daemon=True).start()
        deadline = time.monotonic() + args.idle_seconds
        idle = post_while(url, args.rate, lambda: time.monotonic() < deadline)
        with db_session:
            jobs.enqueue(JobKind.HEALTH)
            before = AnsibleRun.select().count()
        wake.set()

        def sweeping() -> bool:
            with db_session:
                runs = AnsibleRun.select().count()
                running = AnsibleRun.select(lambda r: r.status == "running").exists()
            return runs == before or running
        started = time.perf_counter()
        during = post_while(url, args.rate, sweeping)
        sweep_seconds = time.perf_counter() - started
        stop.set()
        server.stop()
    idle_text, idle_p99 = describe(idle)
    during_text, during_p99 = describe(during)
    print(f"webhooks, worker idle:                {idle_text}")
    print(f"webhooks, during a {sweep_seconds:.1f} s health sweep: {during_text}")
    print(f"p99 during the sweep / p99 idle: {during_p99 / idle_p99:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
