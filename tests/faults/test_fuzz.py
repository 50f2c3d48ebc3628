"""Fuzzing a real `provisioner serve --no-worker` on a loopback port: at least 10,000
seeded requests over every public and admin route of the app (taken from the app's own
route table, so a new route is fuzzed without touching this file), with and without
admin credentials, odd methods, Latin-1 header bytes, bad chunking and lengths, deep and
huge JSON, signed and unsigned webhooks, sent over raw sockets.

It asserts what an attacker must never get: a 5xx (no test here makes the database busy,
so not even a 503 is allowed), a dead service, or memory that grows with the traffic.
Reproduce a run with FUZZ_SEED=<the printed seed>.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter

from provisioner.web import create_app
from tests.faults.fuzzing import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    RequestMaker,
    running_service,
    send,
    stripe_checkout_stand_in,
    stripe_event_shapes,
)
from tests.wsgi import basic

SEED = int(os.environ.get("FUZZ_SEED", "20261114"))
REQUESTS = 10_000
WARM_UP = 2_000
CLIENTS = 8
MAX_RSS_GROWTH_MB = 30


def app_routes(config) -> list[tuple[str, str]]:
    return [(route.method, route.rule) for route in create_app(config).routes]


def existing_ids(service) -> list[int]:
    """Ids that name rows (so lookups succeed as often as they fail) and a few that do not."""
    top = max(service.rows('SELECT MAX(id) FROM (SELECT id FROM "Instance" UNION ALL '
                           'SELECT id FROM "Job" UNION ALL SELECT id FROM "StripeEvent" '
                           'UNION ALL SELECT id FROM "AnsibleRun")')[0][0] or 0, 1)
    return [*range(1, top + 1), top + 1, top + 1000]


def csrf_token(service) -> str:
    status, html = service.get("/admin/instances/1/", headers=basic(ADMIN_USER, ADMIN_PASSWORD))
    assert status == 200, html[:300]
    return re.search(rb'name="csrf" value="([0-9a-f]+)"', html).group(1).decode()


def fuzz(service, makers: list[RequestMaker], per_client: int) -> tuple[Counter, list]:
    """Each client thread sends its own seeded sequence; statuses tallied by kind."""
    counts: Counter = Counter()
    server_errors: list = []
    lock = threading.Lock()

    def client(maker: RequestMaker) -> None:
        for _ in range(per_client):
            request = maker.make()
            try:
                status = send(service.port, request)
            except OSError as exc:  # e.g. the client's own timeout: no answer in 30 s
                status = None
                request = type(request)(f"{request.kind} ({exc!r})", request.data)
            with lock:
                counts[(request.kind.split(" ")[0], status)] += 1
                if status is None or status >= 500:
                    server_errors.append((status, request.kind, request.data[:300]))

    threads = [threading.Thread(target=client, args=(maker,)) for maker in makers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts, server_errors


def status_classes(counts: Counter) -> Counter:
    classes: Counter = Counter()
    for (_, status), n in counts.items():
        classes["no answer" if status is None else f"{status // 100}xx"] += n
    return classes


def test_ten_thousand_generated_requests_get_no_5xx_and_memory_stays_flat(tmp_path, config):
    routes = app_routes(config)
    print(f"\nfuzz seed {SEED} (FUZZ_SEED={SEED} reproduces it); {len(routes)} routes")
    with stripe_checkout_stand_in() as stripe_api, running_service(
            tmp_path / "service", worker=False, seed=True,
            STRIPE_SECRET_KEY="sk_test_fuzz", STRIPE_PRICE_ID="price_fuzz",
            STRIPE_API_BASE=stripe_api) as service:
        ids, csrf, shapes = existing_ids(service), csrf_token(service), stripe_event_shapes()
        makers = [RequestMaker(random.Random(f"{SEED}-{n}"), routes, ids, csrf, shapes)
                  for n in range(CLIENTS)]
        rss_start = service.rss_mb()
        # Threads, caches and per-thread database connections fill first: memory that
        # grows with the traffic is what the measured part would show.
        warm_counts, warm_errors = fuzz(service, makers, WARM_UP // CLIENTS)
        rss_before = service.rss_mb()
        started = time.monotonic()
        counts, server_errors = fuzz(service, makers, REQUESTS // CLIENTS)
        seconds = time.monotonic() - started
        rss_after = service.rss_mb()
        health = service.get("/api/health/")[0]
        alive = service.alive()
        report(counts + warm_counts, seconds, rss_start, rss_before, rss_after, service)
        server_errors += warm_errors
        assert not server_errors, (
            f"{len(server_errors)} answers of 5xx or none at all, e.g.:\n" +
            "\n".join(repr(e) for e in server_errors[:10]) + "\n" + service.log_tail(80))
        assert sum(counts.values()) >= REQUESTS
        assert alive and health == 200
        assert "unexpected error" not in service.log_path.read_text(errors="replace")
        assert rss_after - rss_before < MAX_RSS_GROWTH_MB
        # Bad input is refused, not just survived: most of it was a 4xx with a reason.
        assert status_classes(counts)["4xx"] > sum(counts.values()) // 3


def report(counts: Counter, seconds: float, rss_start: float, rss_before: float,
           rss_after: float, service) -> None:
    total = sum(counts.values())
    by_kind, by_status = Counter(), Counter()
    for (kind, status), n in counts.items():
        by_kind[kind] += n
        by_status[status] += n
    classes = status_classes(counts)
    print(f"fuzz: {total} requests ({WARM_UP} of them warm-up), {REQUESTS} measured in "
          f"{seconds:.1f} s ({REQUESTS / seconds:.0f}/s) by {CLIENTS} clients")
    print(f"fuzz: by kind {dict(sorted(by_kind.items()))}")
    print(f"fuzz: by status class {dict(sorted(classes.items()))}; 5xx: {classes['5xx']}")
    print(f"fuzz: by status {dict(sorted(by_status.items(), key=str))}")
    print(f"fuzz: RSS at start {rss_start:.1f} MB, after warm-up {rss_before:.1f} MB, after "
          f"{rss_after:.1f} MB (+{rss_after - rss_before:.1f} MB over the measured requests)")
    deliveries = service.rows('SELECT outcome, COUNT(*) FROM "WebhookDelivery" GROUP BY outcome')
    print(f"fuzz: webhook deliveries written down {dict(deliveries)}")
