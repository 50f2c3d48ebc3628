"""Plans: the file, the signup page and Checkout, limits reaching the role, plan changes
applied or refused, trials, payments that need the customer, disputes, revenue.

Playbook runs are recorded (tests/integration/test_plan_limits.py runs the same
through real containers); events, the worker, the queue and the outbox are real.
"""

from __future__ import annotations

import dataclasses
import email
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pony.orm import db_session, select

from provisioner import admin, alerts, models, plans, revenue
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.config import ConfigError
from provisioner.models import Instance, Job, Notification, StripeEvent, Subscription, utcnow
from provisioner.testing import stripe_events
from provisioner.web import create_app
from provisioner.worker import Worker
from tests.conftest import RecordingRunner
from tests.wsgi import call

PLANS_TOML = """
[[plan]]
key = "starter"
name = "Starter"
price_id = "price_starter"
price_pence = 1200
memory_mb = 256
cpus = 0.5
pids_limit = 128
disk_mb = 1024

[[plan]]
key = "pro"
name = "Pro"
price_id = "price_pro"
price_pence = 2900
memory_mb = 1024
cpus = 2
pids_limit = 512
disk_mb = 10240
trial_days = 14
"""
LIMITS = {"starter": {"memory_mb": 256, "cpus": 0.5, "pids_limit": 128, "disk_mb": 1024},
          "pro": {"memory_mb": 1024, "cpus": 2.0, "pids_limit": 512, "disk_mb": 10240}}
PRICES = {"starter": 1200, "pro": 2900}


@pytest.fixture
def plan_config(config, tmp_path):
    path = tmp_path / "plans.toml"
    path.write_text(PLANS_TOML)
    return dataclasses.replace(config, plans_file=str(path),
                               admin_notify_email="ops@example.com")


class Customer:
    """One Stripe customer and subscription, and the events Stripe would send about it."""

    def __init__(self, subdomain="plan-shop", plan="starter"):
        self.subdomain = subdomain
        self.customer = stripe_events.new_id("cus")
        self.sub_id = stripe_events.new_id("sub")
        self.plan = plan
        self.t = int(time.time()) - 3600

    def tick(self, evt: dict) -> dict:
        self.t += 10
        evt["created"] = self.t
        return evt

    def checkout(self, payment_status="paid") -> dict:
        session = stripe_events.checkout_session(
            subdomain=self.subdomain, site_name="Plan Shop", email="owner@example.com",
            customer=self.customer, subscription=self.sub_id, payment_status=payment_status)
        session["metadata"]["plan"] = self.plan
        return self.tick(stripe_events.event("checkout.session.completed", session))

    def subscription(self, status="active", plan=None, event_type=None, **extra) -> dict:
        plan = plan or self.plan
        sub = stripe_events.resource("subscription")
        sub.update({"id": self.sub_id, "customer": self.customer, "status": status,
                    "cancel_at": None, "canceled_at": None, "ended_at": None,
                    "trial_end": None, **extra})
        item = sub["items"]["data"][0]
        item["price"].update(id=f"price_{plan}", unit_amount=PRICES[plan], currency="gbp",
                             recurring={**item["price"]["recurring"], "interval": "month",
                                        "interval_count": 1})
        item.update(current_period_start=self.t, current_period_end=self.t + 30 * 86400)
        return self.tick(stripe_events.event(
            event_type or "customer.subscription.updated", sub))

    def invoice(self, event_type="invoice.paid", **extra) -> dict:
        inv = stripe_events.invoice(customer=self.customer, subscription=self.sub_id,
                                    status="paid" if event_type == "invoice.paid" else "open")
        inv.update(extra)
        return self.tick(stripe_events.event(event_type, inv))


def record(evt: dict) -> None:
    from provisioner import intake

    intake.record(evt, stripe_events.encode(evt))


def deliver(config, *evts, runner=None) -> RecordingRunner:
    runner = runner or operations.BACKEND
    operations.BACKEND = runner
    worker = Worker(config)
    for evt in evts:
        record(evt)
        worker.run_once()
    return runner


def store() -> Instance:
    return Instance.get(subdomain="plan-shop", live=True)


def limits_of(stores: list[dict]) -> dict:
    return {k: stores[0].get(k) for k in ("memory_mb", "cpus", "pids_limit", "disk_mb")}


def outbox(config, notice: str) -> list[email.message.Message]:
    return [email.message_from_bytes(p.read_bytes())
            for p in sorted(config.outbox_dir.glob(f"{notice}-*.eml"))]


def bodies(message) -> tuple[str, str]:
    parts = {p.get_content_type(): p.get_payload(decode=True).decode()
             for p in message.walk() if not p.is_multipart()}
    return parts["text/plain"], parts["text/html"]


class RefusingRunner(RecordingRunner):
    """The role refuses to lower a store's limits the first `times` it is asked."""

    def __init__(self, times=1):
        super().__init__()
        self.times = times

    def __call__(self, config, playbook, stores, secrets=None, **kwargs):
        self.runs.append((playbook, stores))
        hosts = {}
        for s in stores:
            lowering = s.get("memory_mb") == LIMITS["starter"]["memory_mb"] and \
                s.get("limits_excess") == "refuse"
            if lowering and self.times > 0:
                self.times -= 1
                hosts[s["name"]] = HostOutcome(ok=False, error=(
                    f"plan refused: ebuilder_{s['name']} uses 600 MiB of memory, more than "
                    f"the plan's 256 MiB; limits left as they were"))
            else:
                hosts[s["name"]] = HostOutcome(ok=True)
        return RunResult(ident="x", playbook=playbook, status="successful", rc=0,
                         artifact_dir=Path("/nonexistent"), hosts=hosts)


# -- the plans file ----------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("", "at least one [[plan]]"),
    ("[[plan]]\nkey='a'\nname='A'\nprice_id='price_a'", "price_pence is required"),
    ("[[plan]]\nkey='a'\nname='A'\nprice_id='nope'\nprice_pence=1", "Stripe Price id"),
    ("[[plan]]\nkey='A B'\nname='A'\nprice_id='price_a'\nprice_pence=1", "key must be"),
    ("[[plan]]\nkey='a'\nname='A'\nprice_id='price_a'\nprice_pence='1'", "price_pence has"),
    ("[[plan]]\nkey='a'\nname='A'\nprice_id='price_a'\nprice_pence=1\nmemory_mb=4",
     "at least 16"),
    ("[[plan]]\nkey='a'\nname='A'\nprice_id='price_a'\nprice_pence=1\nram=4", "unknown field"),
    ("[[plan]]\nkey='a'\nname='A'\nprice_id='price_a'\nprice_pence=1\n"
     "[[plan]]\nkey='a'\nname='B'\nprice_id='price_b'\nprice_pence=2", "two plans have key"),
    ("[[plan]\n", "not valid TOML"),
])
def test_a_bad_plans_file_is_one_line_naming_the_plan_and_field(text, problem):
    with pytest.raises(ConfigError, match="plans.toml") as error:
        plans.parse(text, where="plans.toml")
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_the_example_plans_file_is_valid():
    example = Path(__file__).resolve().parents[1] / "deploy" / "plans.example.toml"
    found = plans.parse(example.read_text(), where=str(example))
    assert [p.key for p in found] == ["starter", "pro"] and found[1].trial_days == 14


def test_without_a_plans_file_the_one_plan_comes_from_the_settings(config):
    one = dataclasses.replace(config, stripe_price_id="price_x", plan_price_pence=1500)
    (plan,) = plans.all_plans(one)
    assert (plan.price_id, plan.price_pence, plan.price_text) == ("price_x", 1500, "£15")
    assert plan.memory_mb > 0 and plan.cpus > 0 and plan.pids_limit > 0


def test_without_a_plans_file_every_store_has_the_one_plan(config):
    from provisioner import store_plans

    with db_session:
        instance = Instance(subdomain="one-plan", site_name="O", admin_email="o@e.com",
                            port=19160, plan_price_id="price_unset")
        one = dataclasses.replace(config, stripe_price_id="price_set_later")
        assert store_plans.current(one, instance).price_id == "price_set_later"


def test_a_missing_plans_file_is_a_config_error(config, tmp_path):
    with pytest.raises(ConfigError, match="PLANS_FILE"):
        plans.all_plans(dataclasses.replace(config, plans_file=str(tmp_path / "none.toml")))


def test_signup_page_lists_the_plans_from_the_file(plan_config):
    status, html, _ = call(create_app(plan_config), "GET", "/", raw=True)
    text = html.decode()
    assert status == 200
    assert "Starter" in text and "£12" in text and "Pro" in text and "£29" in text
    assert "14 days free" in text and "£12 a month" not in text.replace("£12</span> a", "")


def test_checkout_with_an_unknown_plan_is_400(plan_config):
    status, body = call(create_app(plan_config), "POST", "/api/create-checkout/",
                        {"subdomain": "ok-shop", "site_name": "S", "email": "a@b.co",
                         "plan": "gold"})
    assert status == 400 and "unknown plan 'gold'" in body["error"]


def test_checkout_is_for_the_chosen_plans_price_with_its_trial_and_promotion_codes(
        plan_config):
    from tests.stripe_stub import StripeStub

    stub = StripeStub("checkout.session", id="cs_test_plan", expires_at=int(time.time()) + 3600,
                      url="https://checkout.stripe.com/c/pay/cs_test_plan")
    try:
        app = create_app(dataclasses.replace(plan_config, stripe_api_base=stub.url,
                                             stripe_secret_key="sk_test_" + "k" * 20))
        status, body = call(app, "POST", "/api/create-checkout/",
                            {"subdomain": "pro-shop", "site_name": "Pro Shop",
                             "email": "p@example.com", "plan": "pro"})
        assert status == 200 and body["session_id"] == "cs_test_plan_1"
        status, _ = call(app, "POST", "/api/create-checkout/",
                         {"subdomain": "starter-shop", "site_name": "S", "email": "s@example.com"})
        assert status == 200
    finally:
        stub.close()
    pro, starter = (r["form"] for r in stub.requests)
    assert pro["line_items[0][price]"] == "price_pro"
    assert pro["subscription_data[trial_period_days]"] == "14"
    assert pro["allow_promotion_codes"] == "true"
    assert pro["metadata[plan]"] == pro["subscription_data[metadata][plan]"] == "pro"
    # No plan named: the first; no trial in it, none asked.
    assert starter["line_items[0][price]"] == "price_starter"
    assert "subscription_data[trial_period_days]" not in starter


# -- limits reach the role; a plan change is applied in place --------------------

def test_limits_of_the_chosen_plan_reach_the_role_and_an_upgrade_applies_them(plan_config):
    shop = Customer(plan="starter")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"))
    assert [p for p, _ in runner.runs] == ["provision.yml"]
    assert limits_of(runner.runs[0][1]) == LIMITS["starter"]
    with db_session:
        assert store().plan_price_id == "price_starter"
        assert store().status == "running"

    deliver(plan_config, shop.subscription("active", plan="pro"), runner=runner)
    assert [p for p, _ in runner.runs] == ["provision.yml", "provision.yml"]
    assert limits_of(runner.runs[-1][1]) == LIMITS["pro"]
    assert runner.runs[-1][1][0]["limits_excess"] == "refuse"  # a change: never forced
    with db_session:
        assert (store().plan_price_id, store().status) == ("price_pro", "running")
        detail = admin.instance_detail(plan_config, store().id)
        assert detail["plan"]["name"] == "Pro" and detail["plan_pending"] is None
        assert any("plan Pro" in e["message"] for e in detail["log"])
        # Every later run of the store (an admin restart, the health sweep) keeps them.
        from provisioner.ansible.store_vars import of_instance
        assert of_instance(plan_config, store()).memory_mb == 1024
    # Nothing more to do: the same snapshot again runs nothing.
    deliver(plan_config, shop.subscription("active", plan="pro"), runner=runner)
    assert len(runner.runs) == 2


def test_a_refused_downgrade_keeps_the_old_plan_and_tells_the_admin(plan_config):
    shop = Customer(plan="pro")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"),
                     runner=RefusingRunner(times=1))
    deliver(plan_config, shop.subscription("active", plan="starter"), runner=runner)
    with db_session:
        instance = store()
        assert (instance.status, instance.plan_price_id) == ("running", "price_pro")
        assert instance.plan_refused == "price_starter"
        assert "600 MiB" in instance.plan_problem
        detail = admin.instance_detail(plan_config, instance.id)
        assert detail["plan_refused"]["name"] == "Starter"
        assert detail["plan"]["name"] == "Pro"
        assert not select(j for j in Job if j.state == "failed").exists()
    (alert,) = outbox(plan_config, "admin_plan_refused")
    text, html = bodies(alert)
    assert "600 MiB" in text and "Keeps:  Pro" in text and "/admin/instances/" in html
    runs = len(runner.runs)
    Worker(plan_config).run_once()
    assert len(runner.runs) == runs, "a refused change is not tried again by itself"

    # The admin applies it anyway: forced limits, then the plan is the store's.
    with db_session:
        result = admin.apply_plan(plan_config, store().id, admin.Actor("admin", "127.0.0.1"))
    assert result["job_id"] and result["plan"]["name"] == "Starter"
    Worker(plan_config).run_once()
    assert runner.runs[-1][1][0]["limits_excess"] == "force"
    assert limits_of(runner.runs[-1][1]) == LIMITS["starter"]
    with db_session:
        instance = store()
        assert (instance.plan_price_id, instance.plan_refused, instance.plan_force) == \
            ("price_starter", None, False)
    with db_session, pytest.raises(admin.Conflict, match="no refused plan change"):
        admin.apply_plan(plan_config, store().id, admin.Actor("admin", "127.0.0.1"))


def test_a_refused_downgrade_never_keeps_a_paying_store_suspended(plan_config):
    """Paid again and downgraded at once: the refusal must not block unsuspending."""
    shop = Customer(plan="pro")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"),
                     shop.subscription("unpaid"), runner=RefusingRunner(times=1))
    with db_session:
        assert store().status == "suspended"
    deliver(plan_config, shop.subscription("active", plan="starter"), runner=runner)
    Worker(plan_config).run_once()
    with db_session:
        assert (store().status, store().plan_price_id) == ("running", "price_pro")
        assert store().plan_refused == "price_starter"
    assert limits_of(runner.runs[-1][1]) == LIMITS["pro"]


def test_a_plan_change_waits_for_a_held_store_and_follows_its_start(plan_config):
    shop = Customer(plan="starter")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"))
    actor = admin.Actor("admin", "127.0.0.1")
    with db_session:
        admin.queue_action(store().id, "stop", actor)
    Worker(plan_config).run_once()
    deliver(plan_config, shop.subscription("active", plan="pro"), runner=runner)
    assert [p for p, _ in runner.runs] == ["provision.yml", "stop.yml"]
    with db_session:
        assert (store().status, store().plan_price_id) == ("stopped", "price_starter")
        admin.queue_action(store().id, "start", actor)
    Worker(plan_config).run_once()
    Worker(plan_config).run_once()
    assert [p for p, _ in runner.runs][2:] == ["start.yml", "provision.yml"]
    assert limits_of(runner.runs[-1][1]) == LIMITS["pro"]
    with db_session:
        assert (store().status, store().plan_price_id) == ("running", "price_pro")


def test_a_price_in_no_plan_changes_nothing_and_is_shown(plan_config):
    shop = Customer(plan="starter")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"))
    evt = shop.subscription("active")
    evt["data"]["object"]["items"]["data"][0]["price"]["id"] = "price_legacy"
    deliver(plan_config, evt, runner=runner)
    assert len(runner.runs) == 1
    with db_session:
        detail = admin.instance_detail(plan_config, store().id)
        assert detail["unknown_price"] == "price_legacy" and detail["plan"]["name"] == "Starter"


# -- trials, payments that need the customer, disputes ------------------------

def test_a_trial_runs_the_store_reminds_before_it_ends_then_unpaid_suspends(plan_config):
    shop = Customer(plan="pro")
    trial_end = int(time.time()) + 3 * 86400
    runner = deliver(plan_config, shop.checkout(payment_status="no_payment_required"),
                     shop.subscription("trialing", trial_end=trial_end,
                                       event_type="customer.subscription.created"))
    with db_session:
        assert store().status == "running"
        assert store().subscription.trial_end is not None
    deliver(plan_config, shop.subscription(
        "trialing", trial_end=trial_end, event_type="customer.subscription.trial_will_end"),
        runner=runner)
    (reminder,) = outbox(plan_config, "trial_ending")
    text, html = bodies(reminder)
    day = utcnow().date() + timedelta(days=3)
    assert day.isoformat() in text and "£29" in text
    assert "/account/" in text and "/billing" in html
    # The trial ends unpaid: past_due, the usual grace, then suspended.
    grace = dataclasses.replace(plan_config, suspend_after_days=0)
    deliver(grace, shop.invoice("invoice.payment_failed"), shop.subscription("past_due"),
            runner=runner)
    with db_session:
        assert store().status == "suspended"
        events = admin.instance_detail(plan_config, store().id)["billing_events"]
    assert "customer.subscription.trial_will_end" in {e["type"] for e in events}


def test_a_payment_that_needs_the_customer_emails_the_invoice_and_keeps_the_store_up(
        plan_config):
    shop = Customer(plan="starter")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"),
                     shop.invoice())
    link = "https://invoice.stripe.com/i/acct_1/test_abc"
    deliver(plan_config, shop.invoice("invoice.payment_action_required",
                                      hosted_invoice_url=link), runner=runner)
    with db_session:
        assert (store().status, store().subscription.status) == ("running", "past_due")
        assert Notification.get(notice="payment_action") is not None
    (mail,) = outbox(plan_config, "payment_action")
    text, html = bodies(mail)
    assert link in text and f'href="{link}"' in html
    # Not an https link from Stripe: never put in an email.
    deliver(plan_config, shop.invoice("invoice.payment_action_required",
                                      hosted_invoice_url="javascript:alert(1)"),
            runner=runner)
    for mail in outbox(plan_config, "payment_action"):
        assert "javascript:" not in bodies(mail)[1]
    assert len(runner.runs) == 1


def test_a_dispute_alerts_the_admin_and_leaves_the_store_alone(plan_config):
    shop = Customer(plan="starter")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"))
    dispute = stripe_events.resource("dispute")
    dispute.update(id="du_test_1", amount=1200, currency="gbp", reason="fraudulent",
                   status="needs_response",
                   charge={**stripe_events.resource("charge"), "customer": shop.customer})
    deliver(plan_config, shop.tick(stripe_events.event("charge.dispute.created", dispute)),
            runner=runner)
    assert len(runner.runs) == 1
    with db_session:
        assert store().status == "running"
        event = StripeEvent.get(type="charge.dispute.created")
        assert event.stripe_customer_id == shop.customer
        listed = admin.instance_detail(plan_config, store().id)["billing_events"]
        assert listed[0]["type"] == "charge.dispute.created"
    (alert,) = outbox(plan_config, "admin_dispute")
    assert "du_test_1 of 12.00 GBP, reason fraudulent" in bodies(alert)[0]


# -- any order, same result --------------------------------------------------

def test_every_order_of_trial_plan_change_and_payments_ends_the_same(plan_config):
    from tests.test_lifecycle import permutations

    shop = Customer(plan="pro")
    trial_end = int(time.time()) + 3 * 86400
    evts = [shop.checkout(payment_status="no_payment_required"),
            shop.subscription("trialing", trial_end=trial_end,
                              event_type="customer.subscription.created"),
            shop.subscription("trialing", trial_end=trial_end,
                              event_type="customer.subscription.trial_will_end"),
            shop.invoice("invoice.payment_action_required",
                         hosted_invoice_url="https://invoice.stripe.com/i/x"),
            shop.subscription("active", plan="starter"),
            shop.invoice()]
    finals = set()
    for order in permutations(evts, 40, seed=2026):
        models.reset()
        runner = deliver(plan_config, *order, runner=RecordingRunner())
        with db_session:
            (instance,) = Instance.select()[:]
            finals.add((instance.status, instance.subscription.status,
                        instance.subscription.price_id, instance.plan_price_id,
                        select(j for j in Job if j.state == "failed").count()))
            assert select(n for n in Notification if n.notice == "welcome").count() == 1
            assert select(n for n in Notification if n.notice == "trial_ending").count() <= 1
        assert limits_of(runner.runs[-1][1]) == LIMITS["starter"]
    assert finals == {("running", "active", "price_starter", "price_starter", 0)}


# -- revenue from the subscriptions' own prices -------------------------------

def test_revenue_counts_billed_subscriptions_at_their_own_prices(plan_config):
    now = utcnow()
    with db_session:
        rows = [("active", "price_starter", 1200), ("active", "price_starter", 1200),
                ("past_due", "price_pro", 2900), ("trialing", "price_pro", 2900),
                ("active", "price_pro", 29000 // 12),  # a yearly price, billed a month
                ("canceled", "price_pro", 2900)]
        for n, (status, price, monthly) in enumerate(rows):
            Subscription(stripe_id=f"sub_{n}", status=status, price_id=price,
                         monthly_amount=monthly, currency="gbp", payment_confirmed=True,
                         canceled_at=now - timedelta(days=2) if status == "canceled" else None)
        # A checkout that was never paid is no churn.
        Subscription(stripe_id="sub_unpaid", status="canceled", canceled_at=now)
        Subscription(stripe_id="sub_old", status="canceled", canceled_at=now - timedelta(40))
        for n in range(3):
            StripeEvent(stripe_id=f"evt_f{n}", type="invoice.payment_failed", payload="{}")
        StripeEvent(stripe_id="evt_old", type="invoice.payment_failed", payload="{}",
                    received_at=now - timedelta(days=31))
        figures = revenue.figures(plan_config)
    assert figures["mrr_pence"] == 1200 * 2 + 2900 + 29000 // 12
    assert figures["billed_subscriptions"] == 4 and figures["trialing_subscriptions"] == 1
    assert figures["failed_payments_in_window"] == 3
    assert figures["churn_rate"] == round(1 / 5, 4)
    by_plan = {row["plan"]: row for row in figures["plans"]}
    assert by_plan["Starter"]["mrr_pence"] == 2400 and by_plan["Starter"]["active"] == 2
    assert (by_plan["Pro"]["active"], by_plan["Pro"]["past_due"], by_plan["Pro"]["trialing"]) \
        == (1, 1, 1)


def test_stats_api_and_dashboard_show_revenue(plan_config):
    from tests.wsgi import basic

    configured = dataclasses.replace(plan_config, admin_password="pw-" + "x" * 20)
    with db_session:
        Subscription(stripe_id="sub_a", status="active", price_id="price_pro",
                     monthly_amount=2900, currency="gbp")
    app = create_app(configured)
    auth = basic("admin", configured.admin_password)
    status, stats = call(app, "GET", "/api/stats/", headers=auth)
    assert status == 200 and stats["monthly_recurring_revenue_pence"] == 2900
    assert {p["plan"] for p in stats["revenue"]["plans"]} == {"Starter", "Pro"}
    status, html, _ = call(app, "GET", "/admin/", headers=auth, raw=True)
    assert status == 200 and b'id="plans"' in html and b"29.00 GBP" in html
    assert json.dumps(stats)  # serialisable as it is


def test_a_bad_plans_file_stops_start_up_with_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "plans.toml"
    bad.write_text("[[plan]]\nkey = 'a'\nname = 'A'\nprice_id = 'nope'\nprice_pence = 1\n")
    env = {"PATH": "/usr/bin:/bin", "PROVISIONER_DATA_DIR": str(tmp_path / "data"),
           "STRIPE_WEBHOOK_SECRET": "whsec_x", "BASE_DOMAIN": "x.test",
           "PLANS_FILE": str(bad), "PROVISIONER_ENV_FILE": str(tmp_path / "none.env")}
    checked = subprocess.run([sys.executable, "-m", "provisioner.cli", "settings", "--check"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert checked.returncode == 2
    assert checked.stderr.strip().splitlines() == [
        f"provisioner: configuration error: {bad}: plan 1: price_id must be a Stripe Price "
        f"id (price_...)"]


# -- the plan's disk, measured -------------------------------------------------

class MeasuringRunner(RecordingRunner):
    """health.yml's answer: every store healthy, each data dir this many MiB."""

    def __init__(self, usage: dict[str, float]):
        super().__init__()
        self.usage = usage
        self.measured: list[bool] = []

    def __call__(self, config, playbook, stores, secrets=None, **kwargs):
        result = super().__call__(config, playbook, stores)
        measure = bool((kwargs.get("extra_vars") or {}).get("health_measure_disk"))
        self.measured.append(measure)
        if measure:
            result.disk_usage = dict(self.usage)
        return result


def test_the_sweep_measures_data_hourly_and_alerts_once_per_stretch_over_the_plan(
        plan_config):
    from provisioner import maintenance

    shop = Customer(plan="starter")  # 1024 MiB of disk
    deliver(plan_config, shop.checkout(), shop.subscription("active"))
    runner = operations.BACKEND = MeasuringRunner({"plan-shop": 1500.0})
    report = maintenance.health_sweep(plan_config)
    assert runner.measured == [True] and report.counts["over their disk"] == 1
    assert "1 over their disk" in report.summary()
    maintenance.health_sweep(plan_config)  # within DISK_CHECK_MINUTES: not measured
    assert runner.measured == [True, False]
    with db_session:
        instance = store()
        assert (instance.disk_used_mb, instance.disk_over_since is not None) == (1500.0, True)
        instance.disk_measured_at -= timedelta(minutes=plan_config.disk_check_minutes)
        detail = admin.instance_detail(plan_config, instance.id)
    assert detail["disk"]["used_mb"] == 1500.0 and detail["disk"]["limit_mb"] == 1024
    maintenance.health_sweep(plan_config)  # measured again, still over: no new alert
    assert runner.measured[-1] is True
    alerts.deliver_due(plan_config)  # the disk_full incident's email (alerts.py)

    def disk_alerts() -> list[str]:
        return [m["Subject"] for m in outbox(plan_config, "alert")
                if "store plan-shop: disk nearly full" in m["Subject"]]

    assert disk_alerts() == ["[provisioner] ALERT store plan-shop: disk nearly full"]
    (alert,) = [m for m in outbox(plan_config, "alert") if "ALERT store plan-shop" in m["Subject"]]
    assert "1500 MiB, 146% of the plan's 1024 MiB" in bodies(alert)[0]

    runner.usage = {"plan-shop": 900.0}  # below ALERT_DISK_PERCENT (90%): resolved
    with db_session:
        store().disk_measured_at -= timedelta(minutes=plan_config.disk_check_minutes)
    maintenance.health_sweep(plan_config)
    alerts.deliver_due(plan_config)
    with db_session:
        assert (store().disk_used_mb, store().disk_over_since) == (900.0, None)
    assert sorted(disk_alerts()) == ["[provisioner] ALERT store plan-shop: disk nearly full",
                                     "[provisioner] RESOLVED store plan-shop: disk nearly full"]



# -- what a review found ---------------------------------------------------------

def test_a_refused_change_is_tried_again_when_the_customer_changes_plan_again(plan_config):
    shop = Customer(plan="pro")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"),
                     shop.subscription("active", plan="starter"),
                     runner=RefusingRunner(times=1))
    with db_session:
        assert store().plan_refused == "price_starter"
    runner.times = 1
    deliver(plan_config, shop.subscription("active", plan="pro"),
            shop.subscription("active", plan="starter"), runner=runner)
    with db_session:
        assert store().plan_refused == "price_starter"
    assert sum(1 for _, stores in runner.runs
               if stores[0].get("limits_excess") == "refuse") == 2
    Worker(plan_config).run_once()
    assert len(outbox(plan_config, "admin_plan_refused")) == 2


def test_a_forced_change_overtaken_by_another_price_forces_nothing_later(plan_config):
    shop = Customer(plan="pro")
    runner = deliver(plan_config, shop.checkout(), shop.subscription("active"),
                     shop.subscription("active", plan="starter"),
                     runner=RefusingRunner(times=1))
    with db_session:
        admin.apply_plan(plan_config, store().id, admin.Actor("admin", "127.0.0.1"))
    record(shop.subscription("active", plan="pro"))  # before the forced run
    Worker(plan_config).run_once()
    with db_session:
        assert (store().plan_price_id, store().plan_force) == ("price_pro", False)
    deliver(plan_config, shop.subscription("active", plan="starter"), runner=runner)
    assert runner.runs[-1][1][0]["limits_excess"] == "refuse"


def test_a_plan_no_longer_in_the_file_leaves_the_limits_alone(plan_config, tmp_path):
    from provisioner.ansible.store_vars import of_instance

    shop = Customer(plan="pro")
    deliver(plan_config, shop.checkout(), shop.subscription("active"))
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(PLANS_TOML.split("[[plan]]")[0] + "[[plan]]"
                       + PLANS_TOML.split("[[plan]]")[1])  # Starter only
    retired = dataclasses.replace(plan_config, plans_file=str(smaller))
    with db_session:
        store_vars = of_instance(retired, store())
        assert store_vars.memory_mb is None and store_vars.limits_excess is None
        detail = admin.instance_detail(retired, store().id)
    assert "price_pro" in detail["plan"]["name"]
    assert "left as they are" in detail["plan"]["limits_text"]


def test_a_broken_edit_of_the_plans_file_keeps_the_plans_it_had(plan_config, caplog):
    assert [p.key for p in plans.all_plans(plan_config)] == ["starter", "pro"]
    path = Path(plan_config.plans_file)
    path.write_text("[[plan]]\nkey = 'broken'\n")
    assert [p.key for p in plans.all_plans(plan_config)] == ["starter", "pro"]
    assert "name is required" in caplog.text and "stay in use" in caplog.text


def test_a_late_trial_reminder_after_the_trial_ended_sends_nothing(plan_config):
    shop = Customer(plan="pro")
    trial_end = int(time.time()) + 3 * 86400
    reminder = shop.subscription("trialing", trial_end=trial_end,
                                 event_type="customer.subscription.trial_will_end")
    deliver(plan_config, shop.checkout(), shop.subscription("canceled", ended_at=shop.t),
            reminder)
    Worker(plan_config).run_once()
    assert outbox(plan_config, "trial_ending") == []


def test_a_payment_email_without_a_link_never_shows_the_stores_status(plan_config):
    shop = Customer(plan="starter")
    deliver(plan_config, shop.checkout(), shop.subscription("active"), shop.invoice())
    with db_session:
        store().status_message = "retrying: docker on host-7 said no"
    deliver(plan_config, shop.invoice("invoice.payment_action_required",
                                      hosted_invoice_url=None))
    (mail,) = outbox(plan_config, "payment_action")
    text, html = bodies(mail)
    assert "host-7" not in text and "host-7" not in html and "/billing" in text


def test_a_dispute_on_a_closed_store_still_alerts_and_stripe_down_retries(plan_config):
    shop = Customer(plan="starter")
    deliver(plan_config, shop.checkout(), shop.subscription("active"))
    with db_session:
        store().live = False  # destroyed long ago
    dispute = stripe_events.resource("dispute")
    dispute.update(id="du_test_2", amount=1200, currency="gbp", reason="fraudulent",
                   status="needs_response", charge="ch_test_2", evidence={})
    stripe_down = dataclasses.replace(plan_config, stripe_secret_key="sk_test_" + "k" * 20,
                                      stripe_api_base="http://127.0.0.1:9")
    evt = shop.tick(stripe_events.event("charge.dispute.created", dispute))
    deliver(stripe_down, evt)
    with db_session:
        event = StripeEvent.get(stripe_id=evt["id"])
        assert event.processed_at is None and "cannot read disputed charge" in event.error
    dispute["charge"] = {**stripe_events.resource("charge"), "customer": shop.customer}
    deliver(plan_config, shop.tick(stripe_events.event("charge.dispute.created", dispute)))
    (alert,) = outbox(plan_config, "admin_dispute")
    assert "du_test_2" in bodies(alert)[0]
