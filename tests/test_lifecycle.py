"""Billing lifecycle at the state level: any order of Stripe's events ends the same way.

Playbook runs are recorded instead of executed here (the integration tests
run the same playbooks on real Docker and nginx); everything else is real:
event handlers, the state function, the queue, the worker, the email outbox.
"""

from __future__ import annotations

import dataclasses
import random
import time
from datetime import timedelta

import pytest
from pony.orm import db_session, select

from provisioner import lifecycle, models, subdomains
from provisioner.ansible import operations
from provisioner.models import Instance, Job, Notification, SubdomainHold, Subscription, utcnow
from provisioner.testing import stripe_events
from provisioner.worker import Worker
from tests.conftest import RecordingRunner, apply_events


def lifecycle_events(with_cancel: bool = True) -> list[dict]:
    """Signup, a failed renewal, a recovery and (optionally) a cancellation."""
    customer, sub_id = stripe_events.new_id("cus"), stripe_events.new_id("sub")
    base = int(time.time()) - 4 * 3600

    def sub(status, t, **extra):
        obj = stripe_events.resource("subscription")
        obj.update({"id": sub_id, "customer": customer, "status": status, "cancel_at": None,
                    "canceled_at": None, "ended_at": None, **extra})
        obj["items"]["data"][0].update(current_period_start=t, current_period_end=t + 2592000)
        return stamped(stripe_events.event(f"customer.subscription.{kind(status)}", obj), t)

    def kind(status):
        return {"incomplete": "created", "canceled": "deleted"}.get(status, "updated")

    def stamped(evt, t):
        evt["created"] = t
        return evt

    def inv(t, paid=True):
        obj = stripe_events.invoice(customer=customer, subscription=sub_id,
                                    status="paid" if paid else "open")
        return stamped(stripe_events.event("invoice.paid" if paid else "invoice.payment_failed",
                                           obj), t)

    checkout = stripe_events.checkout_session(
        subdomain="janes-shop", site_name="Jane's", email="jane@example.com",
        customer=customer, subscription=sub_id, payment_status="unpaid")
    evts = [
        stamped(stripe_events.event("checkout.session.completed", checkout), base),
        sub("incomplete", base),
        inv(base + 60),
        sub("active", base + 60),
        inv(base + 3600, paid=False),
        sub("past_due", base + 3600),
        inv(base + 7200),
        sub("active", base + 7200),
    ]
    if with_cancel:
        evts.append(sub("canceled", base + 9000, canceled_at=base + 9000, ended_at=base + 9000))
    return evts


def deliver(config, evts: list[dict]):
    """Each event as the service would get it: recorded, then the worker drains the queue."""
    # A fresh recorder (tests/conftest.py puts the real backend back after the test).
    runner = operations.BACKEND = RecordingRunner()
    worker = Worker(config)
    for evt in evts:
        _record(evt)
        worker.run_once()
    return runner


def _record(evt: dict) -> None:
    from provisioner import intake

    intake.record(evt, stripe_events.encode(evt))


def final_state():
    with db_session:
        instances = select(i for i in Instance)[:]
        assert len(instances) == 1, "one store, never a second"
        instance = instances[0]
        return {
            "status": instance.status,
            "desired": instance.desired_state,
            "subscription": instance.subscription.status,
            "delete_after_set": instance.delete_after is not None,
            "welcome": select(n for n in Notification if n.notice == "welcome").count(),
            "failed_jobs": select(j for j in Job if j.state == "failed").count(),
        }


def permutations(evts, count, seed):
    rng = random.Random(seed)
    yield list(evts)
    yield list(reversed(evts))
    for _ in range(count):
        order = list(evts)
        rng.shuffle(order)
        if rng.random() < 0.3:  # Stripe also delivers some events twice
            order.insert(rng.randrange(len(order) + 1), rng.choice(evts))
        yield order


def test_every_order_of_a_full_lifecycle_ends_cancelled(config):
    evts = lifecycle_events(with_cancel=True)
    outcomes = []
    for n, order in enumerate(permutations(evts, 60, seed=20261125)):
        models.reset()
        runner = deliver(config, order)
        state = final_state()
        outcomes.append(state)
        assert state["welcome"] <= 1
        if n == 0:  # the real order: the store ran and its customer got the welcome
            assert state["welcome"] == 1
            assert [p for p, _ in runner.runs] == ["provision.yml", "suspend.yml"]
            assert runner.runs[-1][1][0]["page"] == "closed"
    finals = {tuple((k, v) for k, v in s.items() if k != "welcome") for s in outcomes}
    assert finals == {(("status", "cancelled"), ("desired", "cancelled"),
                       ("subscription", "canceled"), ("delete_after_set", True),
                       ("failed_jobs", 0))}


def test_every_order_without_cancellation_ends_running_with_one_welcome(config):
    evts = lifecycle_events(with_cancel=False)
    for order in permutations(evts, 60, seed=7):
        models.reset()
        runner = deliver(config, order)
        state = final_state()
        assert (state["status"], state["subscription"], state["welcome"]) == \
            ("running", "active", 1)
        assert state["failed_jobs"] == 0
        provisions = [stores for p, stores in runner.runs if p == "provision.yml"]
        assert provisions and {s[0]["instance_id"] for s in provisions} == \
            {provisions[0][0]["instance_id"]}


def signed_up(config):
    """A running store after a normal signup; returns the worker and its runner."""
    runner = operations.BACKEND
    worker = Worker(config)
    evts = lifecycle_events()[:4]
    for evt in evts:
        _record(evt)
    worker.run_once()
    with db_session:
        assert Instance.get(subdomain="janes-shop").status == "running"
    return worker, runner, evts


def subscription_event(evts, status, t_offset, **extra):
    """A later snapshot of the signup's subscription."""
    obj = dict(evts[1]["data"]["object"], status=status, **extra)
    evt = stripe_events.event("customer.subscription.updated", obj)
    evt["created"] = evts[1]["created"] + t_offset
    return evt


def test_past_due_runs_through_grace_with_a_warning_then_suspends(config):
    worker, runner, evts = signed_up(config)
    _record(subscription_event(evts, "past_due", 600))
    worker.run_once()
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        assert instance.status == "running"
        assert Notification.get(notice="payment_warning") is not None
        recheck = select(j for j in Job if j.kind == "reconcile" and j.state == "queued").first()
        grace_end = instance.subscription.past_due_since + timedelta(days=7)
        assert abs((recheck.next_run_at - grace_end).total_seconds()) < 5
        # The grace period passes.
        instance.subscription.past_due_since -= timedelta(days=8)
        recheck.next_run_at = utcnow()
    worker.run_once()
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        assert (instance.status, instance.desired_state) == ("suspended", "suspended")
        assert Notification.get(notice="suspended") is not None
    assert runner.runs[-1][0] == "suspend.yml" and runner.runs[-1][1][0]["page"] == "suspended"
    # Paying again brings it back, with a "restored" email.
    paid = stripe_events.event("invoice.paid", stripe_events.invoice(
        customer=evts[1]["data"]["object"]["customer"],
        subscription=evts[1]["data"]["object"]["id"]))
    _record(paid)
    worker.run_once()
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        assert instance.status == "running"
        assert Notification.get(notice="restored") is not None
    assert runner.runs[-1][0] == "provision.yml"


@pytest.mark.parametrize("status", ["unpaid", "paused"])
def test_unpaid_and_paused_suspend_at_once(config, status):
    worker, runner, evts = signed_up(config)
    _record(subscription_event(evts, status, 600))
    worker.run_once()
    with db_session:
        assert Instance.get(subdomain="janes-shop").status == "suspended"


def test_stale_snapshot_never_overwrites_a_newer_one(config):
    worker, runner, evts = signed_up(config)
    _record(subscription_event(evts, "canceled", 900, canceled_at=evts[1]["created"] + 900))
    _record(subscription_event(evts, "active", 300))  # older, delivered late
    worker.run_once()
    with db_session:
        assert Subscription.select().first().status == "canceled"
        assert Instance.get(subdomain="janes-shop").status == "cancelled"


def test_cancel_then_resubscribe_brings_the_same_store_back(config):
    worker, runner, evts = signed_up(config)
    ended = evts[1]["created"] + 900
    _record(subscription_event(evts, "canceled", 900, canceled_at=ended))
    worker.run_once()
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        assert instance.status == "cancelled"
        assert abs((instance.delete_after - instance.subscription.canceled_at).days - 30) <= 1
        first_id, first_port = instance.id, instance.port
    for evt in stripe_events.signup(subdomain="janes-shop", site_name="Jane's again",
                                    email="JANE@example.com"):
        _record(evt)
    worker.run_once()
    with db_session:
        instance = Instance.get(subdomain="janes-shop", live=True)
        assert (instance.id, instance.port, instance.status) == (first_id, first_port, "running")
        assert instance.delete_after is None
        assert Instance.select().count() == 1
        assert select(n for n in Notification if n.notice == "welcome").count() == 1
        assert Notification.get(notice="restored") is not None


def test_cleanup_destroys_only_stores_past_their_deletion_date(config):
    worker, runner, evts = signed_up(config)
    _record(subscription_event(evts, "canceled", 900, canceled_at=evts[1]["created"] + 900))
    worker.run_once()
    with db_session:
        assert lifecycle.schedule_deletions() == []
        store = Instance.get(subdomain="janes-shop")
        store.delete_after = utcnow() - timedelta(minutes=1)
        assert lifecycle.schedule_deletions() == [store.id]
    worker.run_once()
    playbook, stores = runner.runs[-1]
    assert playbook == "destroy.yml"
    assert stores[0]["archive"].startswith(str(config.backup_root) + "/janes-shop-")
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        assert (instance.live, instance.status) == (False, "destroyed")
        assert instance.archive_path == stores[0]["archive"]
    with db_session:
        from provisioner import subdomains

        assert subdomains.check_available("janes-shop") == "janes-shop"


def test_expired_checkout_releases_its_held_subdomain(config):
    with db_session:
        subdomains.hold("janes-shop", "cs_test_1", "j@example.com", None)
    with db_session, pytest.raises(subdomains.SubdomainTaken, match="being checked out"):
        subdomains.check_available("janes-shop")
    session = stripe_events.resource("checkout.session")
    session.update(id="cs_test_1", status="expired")
    apply_events(config, [stripe_events.event("checkout.session.expired", session)])
    with db_session:
        assert SubdomainHold.select().count() == 0
        assert subdomains.check_available("janes-shop") == "janes-shop"


def test_grace_length_is_configurable(config):
    short = dataclasses.replace(config, suspend_after_days=0)
    worker, runner, evts = signed_up(short)
    _record(subscription_event(evts, "past_due", 600))
    worker.run_once()
    with db_session:
        assert Instance.get(subdomain="janes-shop").status == "suspended"


def test_a_checkout_that_never_paid_closes_without_telling_anyone(config):
    """incomplete -> incomplete_expired: nothing was built, so nothing runs and no email."""
    evts = lifecycle_events(with_cancel=False)
    expired = dict(evts[1]["data"]["object"], status="incomplete_expired")
    ended = stripe_events.event("customer.subscription.deleted", expired)
    ended["created"] = evts[1]["created"] + 60
    runner = deliver(config, [evts[0], evts[1], ended])
    with db_session:
        instance = Instance.get(subdomain="janes-shop")
        assert (instance.status, instance.desired_state) == ("cancelled", "cancelled")
        assert instance.provisioned_at is None and instance.stopped_since is None
        assert Notification.select().count() == 0
        assert not select(j for j in Job if j.kind == "notify").exists()
    assert runner.runs == []
