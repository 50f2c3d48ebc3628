"""Another process holds the SQLite write lock for 30 s, while a store is being
provisioned and Stripe delivers the next signup."""

from __future__ import annotations

import time

import pytest

from provisioner.testing.faults import database_locked

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LOCK_SECONDS = 30


def retry_after(answer) -> int:
    value = next((v for k, v in answer.headers.items() if k.lower() == "retry-after"), None)
    assert value is not None and value.isdigit() and int(value) > 0, \
        f"503 without a usable Retry-After: {answer.headers}"
    return int(value)


def test_webhooks_answer_503_while_the_db_is_locked_and_nothing_is_lost(stack, measured):
    """The lock comes while the first store's run is on, so the worker has to record its
    end through it; the second signup's deliveries are refused meanwhile and resent
    after. Both stores end live with one email each, every event recorded once."""
    service = stack.service(DB_BUSY_TIMEOUT_SECONDS="2")
    service.deliver(stack.signup("locked-first-shop"))
    stack.wait_run()
    late = stack.signup("locked-late-shop")
    refused = 0
    with database_locked(stack.database):
        locked_at = time.monotonic()
        # Stripe keeps delivering while the fault lasts; each delivery must be refused
        # with a retry hint, not answered 500 nor acknowledged unrecorded.
        while time.monotonic() - locked_at < LOCK_SECONDS:
            for evt in late:
                answer = service.webhook(evt, timeout=20)
                assert answer.status == 503, f"{evt['type']} while locked: {answer}"
                retry_after(answer)
                refused += 1
            assert service.running(), service.log_tail()
    assert refused >= 2
    released = time.monotonic()
    service.deliver(late)  # Stripe's next retry
    stack.wait_live("locked-first-shop")
    stack.wait_live("locked-late-shop")
    measured("both stores live after the lock was released", time.monotonic() - released)
    for name in ("locked-first-shop", "locked-late-shop"):
        stack.assert_end_state(name)
