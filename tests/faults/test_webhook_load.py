"""Stripe's webhooks against a real `provisioner serve` on a loopback port: a steady
200 a second for 10 seconds while its worker works, and a crowd of slow clients that
must not keep real webhooks from being answered.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import statistics
import threading
import time

from provisioner.testing import stripe_events as se
from provisioner.web.server import REQUEST_READ_SECONDS
from tests.faults.fuzzing import WEBHOOK_SECRET, running_service, sign

RATE = 200
SECONDS = 10
CLIENTS = 32
DUPLICATE_SHARE = 0.05
DRAIN_SECONDS = 180
SEED = 14200


def light_events(rng: random.Random, count: int) -> list[dict]:
    """Events in Stripe's real shapes whose processing is database work only: paid and
    failed invoices and subscription changes of customers with no store, expired
    checkouts, a type nobody handles. No store means no playbook to run (and no Docker)."""
    events = []
    for _ in range(count):
        customer, subscription = se.new_id("cus"), se.new_id("sub")
        kind = rng.randrange(5)
        if kind == 0:
            obj = se.invoice(customer=customer, subscription=subscription)
            events.append(se.event("invoice.paid", obj))
        elif kind == 1:
            obj = se.invoice(customer=customer, subscription=subscription, status="open")
            events.append(se.event("invoice.payment_failed", obj))
        elif kind == 2:
            sub = se.resource("subscription")
            sub.update(id=subscription, customer=customer,
                       status=rng.choice(["active", "past_due", "canceled"]))
            events.append(se.event("customer.subscription.updated", sub))
        elif kind == 3:
            events.append(se.event("checkout.session.expired", se.checkout_session(
                subdomain=f"load{rng.randrange(10**6)}", site_name="L", email="l@example.com",
                customer=customer, subscription=subscription)))
        else:
            events.append(se.event("charge.succeeded", se.resource("charge")))
    return events


def deliver(port: int, payload: bytes, timeout: float = 30) -> tuple[int, dict]:
    """One delivery as Stripe makes it: a new connection, a signed JSON POST."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/api/webhook/stripe/", body=payload, headers={
            "Content-Type": "application/json",
            "Stripe-Signature": sign(payload, WEBHOOK_SECRET).decode()})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        connection.close()


def send_at_rate(port: int, payloads: list[bytes]) -> tuple[list, float]:
    """Open loop: payload n goes out at start + n / RATE, whatever the answers take."""
    results: list = [None] * len(payloads)
    next_index = iter(range(len(payloads)))
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def client() -> None:
        while True:
            with lock:
                n = next(next_index, None)
            if n is None:
                return
            time.sleep(max(0.0, start + n / RATE - time.monotonic()))  # the schedule
            sent = time.monotonic()
            try:
                status, body = deliver(port, payloads[n])
            except OSError as exc:
                status, body = None, {"error": repr(exc)}
            results[n] = (status, body, time.monotonic() - sent, sent - start)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.monotonic() - start


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def test_200_webhooks_a_second_for_10_seconds_while_the_worker_works(tmp_path):
    """The worker runs inside `serve` and applies every event (billing work, no playbook)
    while the webhooks arrive: 0 errors, every event recorded exactly once."""
    rng = random.Random(SEED)
    events = light_events(rng, RATE * SECONDS)
    payloads = [se.encode(evt) for evt in events]
    resent = rng.sample(range(len(payloads)), int(len(payloads) * DUPLICATE_SHARE))
    # A redelivery (as Stripe retries) goes out a little after the original.
    schedule = list(payloads)
    for n in sorted(resent, reverse=True):
        schedule.insert(min(len(schedule), n + 40), payloads[n])
    schedule = schedule[:RATE * SECONDS]
    sent_twice = len(schedule) - len({p for p in schedule})
    with running_service(tmp_path / "service", worker=True) as service:
        results, seconds = send_at_rate(service.port, schedule)
        processed_meanwhile = service.rows(
            'SELECT COUNT(*) FROM "StripeEvent" WHERE processed_at IS NOT NULL')[0][0]
        drained_in = wait_until_all_processed(service, len(set(schedule)))
        counts = dict(service.rows('SELECT outcome, COUNT(*) FROM "WebhookDelivery" '
                                   'GROUP BY outcome'))
        per_event = service.rows('SELECT stripe_id, COUNT(*), MAX(duplicates), '
                                 'MAX(failed_at IS NOT NULL) FROM "StripeEvent" '
                                 'GROUP BY stripe_id')
    errors = [r for r in results if r is None or r[0] != 200]
    latencies = [r[2] for r in results if r is not None]
    duplicates_answered = sum(1 for r in results if r and r[0] == 200 and r[1]["duplicate"])
    print(f"\nload: {len(results)} signed webhooks at {RATE}/s scheduled over {SECONDS} s, "
          f"sent in {seconds:.1f} s ({len(results) / seconds:.0f}/s), {CLIENTS} clients")
    print(f"load: errors {len(errors)}; answered duplicate {duplicates_answered} of "
          f"{sent_twice} redeliveries; latency p50 {statistics.median(latencies) * 1000:.1f} "
          f"ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max "
          f"{max(latencies) * 1000:.1f} ms")
    print(f"load: events applied by the worker during the load {processed_meanwhile}, all "
          f"{len(per_event)} {drained_in:.1f} s after it; deliveries {counts}")
    assert not errors, errors[:5]
    sent_ids = {json.loads(p)["id"] for p in schedule}
    assert {row[0] for row in per_event} == sent_ids
    assert all(row[1] == 1 for row in per_event), "an event recorded twice"
    assert sum(row[2] for row in per_event) == sent_twice == duplicates_answered
    assert counts == {"accepted": len(sent_ids), "duplicate": sent_twice}
    assert not any(row[3] for row in per_event), "an event failed to apply"
    assert processed_meanwhile > 0, "the worker applied nothing while the webhooks came"
    assert len(results) / seconds > RATE * 0.75, "the load was not sent at the rate"


def wait_until_all_processed(service, expected: int) -> float:
    started = time.monotonic()
    deadline = started + DRAIN_SECONDS
    while time.monotonic() < deadline:
        done = service.rows('SELECT COUNT(*) FROM "StripeEvent" WHERE processed_at IS NOT NULL '
                            'OR failed_at IS NOT NULL')[0][0]
        if done >= expected:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"the worker applied {done} of {expected} events in {DRAIN_SECONDS} s")


# -- slow clients --------------------------------------------------------------------------

class SlowClient(threading.Thread):
    """Sends a webhook's headers, then its body a byte a second (each byte well inside the
    socket timeout), until the server drops it; notes how long that took."""

    def __init__(self, port: int, ready: threading.Barrier):
        super().__init__(daemon=True)
        self.port, self.ready = port, ready
        self.ended: str | None = None
        self.held_for: float | None = None

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(b"POST /api/webhook/stripe/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            started = time.monotonic()
            self.ready.wait()
            sock.settimeout(1)  # the trickle's pace: a byte, then a second's look for an end
            while time.monotonic() - started < 60:
                try:
                    sock.sendall(b" ")
                    answer = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    answer = b"reset"
                self.ended = answer[:12].decode(errors="replace") or "closed"
                self.held_for = time.monotonic() - started
                return


def webhooks_among_slow_clients(service, slow_clients: int, webhooks: int = 5) -> dict:
    ready = threading.Barrier(slow_clients + 1)
    crowd = [SlowClient(service.port, ready) for _ in range(slow_clients)]
    for client in crowd:
        client.start()
    ready.wait()  # every slow client has its request open
    answers: list = [None] * webhooks

    def webhook(n: int) -> None:
        payload = se.encode(light_events(random.Random(n), 1)[0])
        sent = time.monotonic()
        status, _ = deliver(service.port, payload, timeout=60)
        answers[n] = (status, time.monotonic() - sent)

    senders = [threading.Thread(target=webhook, args=(n,)) for n in range(webhooks)]
    for sender in senders:
        sender.start()
    for thread in senders + crowd:
        thread.join(timeout=90)
    return {"webhooks": answers, "slow": [(c.ended, c.held_for) for c in crowd]}


def test_slow_clients_cannot_keep_real_webhooks_from_being_answered(tmp_path):
    """Three times as many slow clients as server threads (8, what the issue saw starve
    every webhook), then as many as half the default 32: each webhook is answered 200
    within the request deadline, and each slow client is dropped by then."""
    bound = REQUEST_READ_SECONDS + 5
    for threads, slow in ((8, 24), (32, 16)):
        with running_service(tmp_path / f"service-{threads}", worker=True,
                             SERVER_THREADS=str(threads)) as service:
            seen = webhooks_among_slow_clients(service, slow)
            alive = service.alive()
        waits = [round(w[1], 2) for w in seen["webhooks"] if w]
        held = [round(s[1], 1) for s in seen["slow"] if s[1] is not None]
        print(f"\nslowloris: {threads} threads, {slow} slow clients: 5 webhooks answered "
              f"{[w[0] for w in seen['webhooks'] if w]} in {waits} s; slow clients dropped "
              f"after {min(held, default=0)}-{max(held, default=0)} s "
              f"({sorted({s[0] for s in seen['slow']}, key=str)})")
        assert alive
        assert all(w is not None and w[0] == 200 and w[1] < bound for w in seen["webhooks"]), \
            seen["webhooks"]
        assert all(s[1] is not None and s[1] < bound for s in seen["slow"]), seen["slow"]
