"""A playbook task that never ends: the run timeout ends it, the job retries, the admin
is told, and the store goes live once the hang is gone."""

from __future__ import annotations

import math
import time
from datetime import datetime

import pytest

from provisioner.testing.faults import RUN_DEADLINE, hanging_nginx, poll, processes_mentioning

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def run_timeout(stack) -> int:
    """JOB_RUN_TIMEOUT_SECONDS for the case: small, yet twice what a healthy provisioning
    run takes on this machine now (13 s on an idle 2-core machine, more when it is busy),
    so that only the hang can hit it."""
    service = stack.service()
    service.deliver(stack.signup("baseline-shop"))
    stack.wait_live("baseline-shop")
    service.stop()
    started, finished = stack.rows('SELECT started_at, finished_at FROM "AnsibleRun" '
                                   "WHERE status = ? ORDER BY id DESC LIMIT 1", "successful")[0]
    took = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    return max(15, math.ceil(2 * took))


def test_a_hung_task_is_ended_by_the_run_timeout_and_the_job_retries(stack, run_timeout,
                                                                     measured):
    flag = stack.root / "hang"
    flag.touch()
    service = stack.service(NGINX_BIN=str(hanging_nginx(stack.root / "nginx-hang", flag)),
                            JOB_RUN_TIMEOUT_SECONDS=str(run_timeout))
    service.deliver(stack.signup("hung-run-shop"))
    try:
        poll(lambda: flag.with_name("hang.waiting").exists(), RUN_DEADLINE,
             "a playbook task to hang")
        hung_at = time.monotonic()

        def timed_out() -> dict | None:
            return next((r for r in stack.runs() if r["status"] == "timeout"), None)
        run = poll(timed_out, run_timeout + 30, "the run timeout to end the hung run")
        measured(f"hung run ended (timeout {run_timeout} s) after",
                 time.monotonic() - hung_at)
        left = processes_mentioning(run["ident"])
        assert not left, f"processes of the timed-out run are left: {left}"
        # The alert says why; it is delivered within seconds, by which time the retry
        # may already be running (so the store's own message has moved on).
        alert = poll(lambda: next((m for m in stack.mailbox.alerts()
                                   if "hung-run-shop" in str(m["Subject"])), None),
                     60, "an admin alert about the timed-out run")
        assert "timed out" in alert.get_body(preferencelist=("plain",)).get_content()
        assert not stack.failed_for_good("hung-run-shop"), "the job gave up instead of retrying"
    finally:
        flag.unlink()
    healed = time.monotonic()
    stack.wait_live("hung-run-shop", 2 * run_timeout + 30)
    measured("live after the hang was removed", time.monotonic() - healed)
    stack.assert_end_state("hung-run-shop")
    assert stack.runs()[-1]["status"] == "successful"
