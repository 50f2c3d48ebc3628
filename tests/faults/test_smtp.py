"""The SMTP server is down, or hung, while stores are provisioned."""

from __future__ import annotations

import time

import pytest

from provisioner.testing.faults import RUN_DEADLINE, HungSMTP, poll, through_nginx

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_smtp_down_during_a_signup_then_up_sends_exactly_one_welcome(stack, measured):
    """The store runs while SMTP is down; its welcome email keeps being retried past
    JOB_MAX_ATTEMPTS (it used to give up: no login, password kept in the DB) and goes
    out once, when SMTP is back."""
    stack.mailbox.stop()
    service = stack.service(JOB_MAX_ATTEMPTS="2")
    service.deliver(stack.signup("mail-down-shop"))

    def still_trying() -> bool:
        job = stack.welcome_job("mail-down-shop")
        return bool(job and job["attempts"] > 2 and job["state"] != "failed"
                    and job["last_error"])
    poll(still_trying, RUN_DEADLINE, "the welcome email to be retried past JOB_MAX_ATTEMPTS")
    store = stack.store("mail-down-shop")
    assert store["status"] == "running" and store["welcome_sent_at"] is None, store
    assert through_nginx(stack.nginx, "mail-down-shop") == 200
    assert "refused" in stack.welcome_job("mail-down-shop")["last_error"].lower()

    stack.mailbox.start()
    back = time.monotonic()
    poll(lambda: stack.live("mail-down-shop"), 60, "the welcome email once SMTP is back")
    measured("welcome sent after SMTP came back", time.monotonic() - back)
    stack.assert_end_state("mail-down-shop")
    password = stack.rows('SELECT admin_password FROM "Instance" WHERE subdomain = ?',
                          "mail-down-shop")
    assert password == [(None,)], "the temporary password outlived its email"


def test_a_hung_smtp_server_holds_up_its_email_only_and_for_a_bounded_time(stack, measured):
    """An SMTP server that accepts and never answers: each exchange ends after
    SMTP_TIMEOUT_SECONDS and the email is retried; while one hangs, the next store goes
    live all the same (emails have their own lane). Each customer gets one email once
    SMTP answers again."""
    stack.mailbox.stop()
    hung = HungSMTP(stack.mailbox.port)
    try:
        service = stack.service(SMTP_TIMEOUT_SECONDS="2")
        service.deliver(stack.signup("hung-first-shop"))

        def timing_out() -> bool:
            job = stack.welcome_job("hung-first-shop")
            return bool(job and job["attempts"] >= 2 and job["state"] != "failed"
                        and "timed out" in (job["last_error"] or "").lower())
        poll(timing_out, RUN_DEADLINE, "the welcome email to time out and be retried")
        service.stop()

        # Now each exchange hangs for minutes: the next store must not wait for it.
        smtp_timeout = 180
        held = hung.holding
        service = stack.service(SMTP_TIMEOUT_SECONDS=str(smtp_timeout))
        poll(lambda: hung.holding > held, RUN_DEADLINE, "the welcome email to hang again")
        hanging = stack.welcome_job("hung-first-shop")
        hanging_since = time.monotonic()
        service.deliver(stack.signup("hung-next-shop"))

        def next_running() -> bool:
            store = stack.store("hung-next-shop")
            return bool(store and store["status"] == "running")
        poll(next_running, RUN_DEADLINE, "the next store to run while SMTP hangs")
        measured("next store running while an email hung", time.monotonic() - hanging_since)
        assert time.monotonic() - hanging_since < smtp_timeout
        assert through_nginx(stack.nginx, "hung-next-shop") == 200
        assert stack.welcome_job("hung-first-shop") == hanging, \
            "the hung send should still be going on"
        assert hanging["state"] == "running", hanging
    finally:
        hung.close()
    stack.mailbox.start()
    healed = time.monotonic()
    for name in ("hung-first-shop", "hung-next-shop"):
        poll(lambda name=name: stack.live(name), 60, f"{name}'s welcome email")
    measured("both welcomes sent after SMTP healed", time.monotonic() - healed)
    for name in ("hung-first-shop", "hung-next-shop"):
        stack.assert_end_state(name)
