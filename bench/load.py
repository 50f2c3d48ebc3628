"""Fixed-rate (open-loop) webhook load, and percentiles.

Requests are sent at their scheduled times whatever the answers do (a slow answer
never delays the next request), each on a new connection as Stripe's are; a
request's latency runs from its scheduled time to the last byte of the answer, so
time spent waiting for a free client thread counts (no coordinated omission).
Payloads are built and signed just before their turn (a signature is valid for
STRIPE_WEBHOOK_TOLERANCE seconds, however long the run).
"""

from __future__ import annotations

import http.client
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from provisioner.testing import stripe_events

CLIENT_THREADS = 48


@dataclass
class LoadResult:
    rate: float
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.latencies) + len(self.errors)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def describe(self) -> str:
        bad = {s: n for s, n in self.statuses.items() if s != 200}
        return (f"{self.sent} sent at {self.rate:g}/s over {self.seconds:.1f} s, {self.ok} x 200"
                + (f", other {bad}" if bad else "")
                + (f", {len(self.errors)} failed ({self.errors[0]})" if self.errors else "")
                + (f"; p50 {self.p(50) * 1000:.1f} ms, p99 {self.p(99) * 1000:.1f} ms, "
                   f"max {max(self.latencies) * 1000:.1f} ms" if self.latencies else ""))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def customer_created(secret: str) -> tuple[bytes, dict]:
    """A signed `customer.created` (a real event the worker applies) and its headers."""
    payload = stripe_events.encode(stripe_events.event(
        "customer.created", stripe_events.resource("customer")))
    return payload, {"Stripe-Signature": stripe_events.sign(payload, secret),
                     "Content-Type": "application/json"}


def post(port: int, path: str, payload: bytes, headers: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=payload, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def fixed_rate(port: int, path: str, secret: str, rate: float,
               keep_going: Callable[[int, float], bool]) -> LoadResult:
    """POST signed events at `rate` per second while `keep_going(sent, elapsed)`."""
    result = LoadResult(rate=rate)
    lock = threading.Lock()
    work: queue.Queue = queue.Queue()

    def client() -> None:
        while (item := work.get()) is not None:
            scheduled, payload, headers = item
            try:
                status = post(port, path, payload, headers)
            except OSError as exc:
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latency = time.perf_counter() - scheduled
            with lock:
                result.latencies.append(latency)
                result.statuses[status] = result.statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    sent = 0
    try:
        while keep_going(sent, time.perf_counter() - started):
            payload, headers = customer_created(secret)
            scheduled = started + sent / rate
            # Pacing the sender (not waiting for a condition): sleep to the next slot.
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            work.put((scheduled, payload, headers))
            sent += 1
    finally:
        for _ in threads:
            work.put(None)
        for thread in threads:
            thread.join(60)
    result.seconds = time.perf_counter() - started
    return result


def for_seconds(port: int, path: str, secret: str, rate: float, seconds: float) -> LoadResult:
    total = round(rate * seconds)
    return fixed_rate(port, path, secret, rate, lambda sent, _: sent < total)
