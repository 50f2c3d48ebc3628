"""The health sweep of N running stores: `provisioner health` (maintenance.health_sweep:
one health.yml run, then a HealthCheck row per store), as an operator runs it, beside
the floor: the same /health/ URLs fetched through nginx (TLS, Host header) in parallel
by a thread pool as wide as the service's ansible forks."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.stack import VENV_BIN, BenchError, BenchStack, run, store_status

SUMMARY = re.compile(r"^health: .* in ([0-9.]+) s$", re.MULTILINE)


def floor(stack: BenchStack, subdomains: list[str], reps: int) -> list[float]:
    times = []
    width = stack.config.ansible_forks
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


@dataclass
class Sweep:
    wall: float
    inner: float | None
    summary: str


def cli(stack: BenchStack, timeout: float) -> Sweep:
    started = time.perf_counter()
    result = run([str(VENV_BIN / "provisioner"), "health", "--timeout", str(timeout)],
                 timeout=timeout, check=False, env=stack.env())
    wall = time.perf_counter() - started
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise BenchError(f"provisioner health failed (rc {result.returncode}): "
                         f"{(result.stdout + result.stderr).strip()[-1500:]}")
    return Sweep(wall, float(match.group(1)), match.group(0))
