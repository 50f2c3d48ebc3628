"""The health sweep of N running stores: `provisioner health` (maintenance.health_sweep:
one health.yml run, then a HealthCheck row per store), as an operator runs it, beside
the floor: the same /health/ URLs fetched through nginx (TLS, Host header) in parallel
by a thread pool of FLOOR_WIDTH threads (store_health_pages' default concurrency, so
the floor does not move with ANSIBLE_FORKS)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from bench.stack import BenchError, BenchStack, Timed, store_status, timed_command

SUMMARY = re.compile(r"^health: .* in ([0-9.]+) s$", re.MULTILINE)
FLOOR_WIDTH = 32


def floor(stack: BenchStack, subdomains: list[str], reps: int) -> list[float]:
    times = []
    width = FLOOR_WIDTH
    for _ in range(reps):
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=width) as pool:
            statuses = list(pool.map(lambda s: store_status(stack.nginx.https_port, s,
                                                            timeout=10), subdomains))
        times.append(time.perf_counter() - started)
        bad = [(s, c) for s, c in zip(subdomains, statuses, strict=True) if c != 200]
        if bad:
            raise BenchError(f"floor sweep: {len(bad)} store(s) not healthy, e.g. {bad[0]}")
    return times


def cli(stack: BenchStack, timeout: float) -> Timed:
    return timed_command(stack, "health", SUMMARY, timeout)
