"""Plans on real containers, and Stripe's subscription lifecycle against localstripe.

The live service's plans are tests/integration/conftest.py's LIVE_PLANS: Starter
(256 MB, 0.5 CPU, 128 processes), Pro (512 MB, 1 CPU, 256, a 14-day trial), Tiny
(disk_mb 1, below any store's data).

localstripe speaks Stripe's API but lacks some of it; where it does, the test says
so and sends the event Stripe would, built from localstripe's own object:
- it never sets a subscription `trialing` (a trial stays `incomplete`), and sends
  no `customer.subscription.trial_will_end` / `updated` (a plan change is silent);
- it sends no `invoice.payment_action_required` (the invoice and its PaymentIntent
  in `requires_action` are real; confirming the payment is its own endpoint);
- it has no Checkout Sessions and no Customer Portal (/v1/billing_portal/sessions).
"""

from __future__ import annotations

import email
import time
import urllib.error
import urllib.parse
import urllib.request
from email import policy
from pathlib import Path

import pytest
import stripe
from pony.orm import db_session

from provisioner import accounts, alerts
from provisioner.models import Customer, Instance
from provisioner.testing import stripe_events
from tests.integration.conftest import ARTIFACTS, inspect, poll, wait_until_live
from tests.integration.test_localstripe import register_webhook

MIB = 1024 * 1024
PRICES = {"starter": 1200, "pro": 2900, "tiny": 500}


class Shop:
    """One customer's subscription, as the events Stripe sends about it."""

    def __init__(self, service, subdomain: str, plan: str):
        self.service, self.subdomain, self.plan = service, subdomain, plan
        self.customer = stripe_events.new_id("cus")
        self.sub_id = stripe_events.new_id("sub")
        self.t = int(time.time()) - 600

    def post(self, evt: dict) -> None:
        self.t += 5
        evt["created"] = self.t
        self.service.post_event(evt)

    def sign_up(self) -> None:
        session = stripe_events.checkout_session(
            subdomain=self.subdomain, site_name=self.subdomain.title(),
            email=f"{self.subdomain}@example.com", customer=self.customer,
            subscription=self.sub_id, payment_status="paid")
        session["metadata"]["plan"] = self.plan
        self.post(stripe_events.event("checkout.session.completed", session))
        self.subscribe(self.plan)
        wait_until_live(self.subdomain)

    def subscribe(self, plan: str) -> None:
        sub = stripe_events.resource("subscription")
        sub.update({"id": self.sub_id, "customer": self.customer, "status": "active",
                    "cancel_at": None, "canceled_at": None, "ended_at": None, "trial_end": None})
        item = sub["items"]["data"][0]
        item["price"].update(id=f"price_{plan}", unit_amount=PRICES[plan], currency="gbp")
        item.update(current_period_start=self.t, current_period_end=self.t + 30 * 86400)
        self.post(stripe_events.event("customer.subscription.updated", sub))


def store(subdomain: str) -> Instance:
    return Instance.get(subdomain=subdomain, live=True)


def limits(container: dict) -> tuple[int, int, int]:
    host = container["HostConfig"]
    return host["Memory"], host["NanoCpus"], host["PidsLimit"]


def mails(service, marker: bytes) -> list:
    return [email.message_from_bytes(m, policy=policy.default)
            for m in service.smtp.messages if marker in m]


def test_limits_at_creation_raised_in_place_and_a_refused_downgrade(service):
    shop = Shop(service, "limits-shop", "starter")
    shop.sign_up()
    container = inspect("ebuilder_limits-shop")
    assert limits(container) == (256 * MIB, 500_000_000, 128)
    with db_session:
        number = store("limits-shop").id
    data = service.config.customer_data_root / str(number)
    (data / "media" / "kept.txt").write_text("the customer's data")

    shop.subscribe("pro")

    def upgraded():
        with db_session:
            return store("limits-shop").plan_price_id == "price_pro"
    poll(upgraded, timeout=120, what="the Pro plan to be applied")
    after = inspect("ebuilder_limits-shop")
    assert after["Id"] == container["Id"], "an upgrade must not recreate the container"
    assert after["State"]["Running"]
    assert limits(after) == (512 * MIB, 1_000_000_000, 256)
    assert (data / "media" / "kept.txt").read_text() == "the customer's data"

    # Tiny allows 1 MB of data: the store has more, so the change is refused.
    (data / "media" / "big.bin").write_bytes(b"x" * (3 * MIB))
    shop.subscribe("tiny")

    def refused():
        with db_session:
            return store("limits-shop").plan_refused == "price_tiny"
    poll(refused, timeout=120, what="the downgrade to be refused")
    status, detail = service.api("GET", f"/api/instances/{number}/")
    assert status == 200 and detail["plan"]["name"] == "Pro"
    assert detail["plan_refused"]["name"] == "Tiny" and "disk" in detail["plan_problem"]
    assert detail["status"] == "running"
    status, page = service.api("GET", f"/admin/instances/{number}/")
    assert status == 200 and 'id="plan-refused"' in page and "Apply Tiny anyway" in page
    assert limits(inspect("ebuilder_limits-shop")) == (512 * MIB, 1_000_000_000, 256)
    poll(lambda: mails(service, b"limits-shop: plan change refused"), timeout=60,
         what="the admin's email about the refusal")

    # The admin applies it anyway: same container, Tiny's limits.
    status, queued = service.api("POST", f"/api/instances/{number}/apply-plan/")
    assert status == 202 and queued["plan"]["name"] == "Tiny"

    def forced():
        with db_session:
            return store("limits-shop").plan_price_id == "price_tiny"
    poll(forced, timeout=120, what="the forced plan")
    final = inspect("ebuilder_limits-shop")
    assert final["Id"] == container["Id"] and final["State"]["Running"]
    assert limits(final) == (192 * MIB, 250_000_000, 64)
    assert (data / "media" / "kept.txt").exists()


def test_the_health_sweep_measures_data_against_the_plans_disk(service):
    shop = Shop(service, "disk-shop", "tiny")  # 1 MiB of disk
    shop.sign_up()
    with db_session:
        number = store("disk-shop").id
    data = service.config.customer_data_root / str(number)
    (data / "media" / "photos.bin").write_bytes(b"x" * (3 * MIB))
    swept = service.cli("health")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "over their disk" in swept.stdout
    with db_session:
        instance = store("disk-shop")
        assert instance.disk_used_mb >= 3 and instance.disk_over_since is not None
    # The disk_full incident's email, sent by alert delivery (in `serve`: every 20 s).
    poll(lambda: alerts.deliver_due(service.config) >= 0
         and mails(service, b"ALERT store disk-shop: disk nearly full"), timeout=60,
         what="the admin's disk alert")
    _, detail = service.api("GET", f"/api/instances/{number}/")
    assert detail["disk"]["limit_mb"] == 1 and detail["disk"]["used_mb"] >= 3


# -- localstripe ------------------------------------------------------------

@pytest.fixture
def client(service, localstripe):
    register_webhook(localstripe, service.url + "/api/webhook/stripe/")
    client = stripe.StripeClient(service.config.stripe_secret_key,
                                 base_addresses={"api": localstripe})
    for key, amount in PRICES.items():
        try:
            client.v1.plans.retrieve(f"price_{key}")
        except stripe.InvalidRequestError:
            product = client.v1.products.create(params={"name": f"eBuilder {key}"})
            client.v1.plans.create(params={"id": f"price_{key}", "product": product.id,
                                           "amount": amount, "currency": "gbp",
                                           "interval": "month"})
    yield client
    register_webhook(localstripe, "http://127.0.0.1:9/")  # it cannot delete a webhook


def customer_with_card(client, email_address: str, number: str):
    token = client.v1.tokens.create(params={"card": {
        "number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}})
    return client.v1.customers.create(params={"email": email_address, "source": token.id})


def checkout(service, subdomain, customer, subscription, plan, payment_status):
    """localstripe has no Checkout Sessions: the completed session is ours to send."""
    session = stripe_events.checkout_session(
        subdomain=subdomain, site_name=subdomain.title(), email=f"{subdomain}@example.com",
        customer=customer, subscription=subscription, payment_status=payment_status)
    session["metadata"]["plan"] = plan
    service.post_event(stripe_events.event("checkout.session.completed", session))


def as_stripe_sends(obj, event_type: str, **overrides) -> dict:
    """An event Stripe would send, built on localstripe's own object."""
    return stripe_events.event(event_type, {**obj.to_dict(), **overrides})


def test_localstripe_trial_then_a_plan_change(service, client):
    customer = customer_with_card(client, "trial-shop@example.com", "4242424242424242")
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"plan": "price_pro"}], "trial_period_days": 14})
    # localstripe leaves a trial `incomplete`; Stripe says `trialing`.
    assert sub.status == "incomplete" and sub.trial_period_days == 14
    checkout(service, "trial-shop", customer.id, sub.id, "pro", "no_payment_required")
    trial_end = int(time.time()) + 3 * 86400
    service.post_event(as_stripe_sends(
        client.v1.subscriptions.retrieve(sub.id), "customer.subscription.trial_will_end",
        status="trialing", trial_end=trial_end))
    wait_until_live("trial-shop")
    assert limits(inspect("ebuilder_trial-shop")) == (512 * MIB, 1_000_000_000, 256)
    (reminder,) = poll(lambda: mails(service, b"Your free trial of Trial-Shop ends soon"),
                       timeout=60, what="the trial reminder")
    text = reminder.get_body(("plain",)).get_content()
    assert "£29" in text and f"{service.config.public_url}/account/" in text

    # The customer moves to Starter during the trial (localstripe sends nothing).
    item = sub["items"]["data"][0]
    client.v1.subscriptions.update(sub.id, params={
        "items": [{"id": item["id"], "plan": "price_starter"}]})
    changed = client.v1.subscriptions.retrieve(sub.id)
    assert changed["items"]["data"][0]["plan"]["id"] == "price_starter"
    created = inspect("ebuilder_trial-shop")["Id"]
    service.post_event(as_stripe_sends(changed, "customer.subscription.updated",
                                       status="trialing", trial_end=trial_end))

    def on_starter():
        with db_session:
            return store("trial-shop").plan_price_id == "price_starter"
    poll(on_starter, timeout=120, what="the Starter plan")
    after = inspect("ebuilder_trial-shop")
    assert after["Id"] == created and limits(after) == (256 * MIB, 500_000_000, 128)
    with db_session:
        assert store("trial-shop").subscription.monthly_amount == 1200


def test_localstripe_payment_that_needs_action_then_confirmed(service, client, localstripe):
    customer = customer_with_card(client, "sca-shop@example.com", "4000002760003184")
    sub = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"plan": "price_starter"}]})
    invoice = client.v1.invoices.retrieve(sub.latest_invoice)
    intent = client.v1.payment_intents.retrieve(invoice.payment_intent)
    assert (sub.status, intent.status) == ("incomplete", "requires_action")
    checkout(service, "sca-shop", customer.id, sub.id, "starter", "unpaid")
    # localstripe does not send it; Stripe would, with the invoice's own page.
    link = "https://invoice.stripe.com/i/acct_test/sca-shop"
    service.post_event(as_stripe_sends(invoice, "invoice.payment_action_required",
                                       hosted_invoice_url=link))
    (asked,) = poll(lambda: mails(service, b"Please confirm your payment for Sca-Shop"),
                    timeout=60, what="the email asking to confirm the payment")
    assert link in asked.get_body(("plain",)).get_content()
    with db_session:
        assert store("sca-shop").status == "pending"  # nothing paid yet: nothing runs

    # The customer confirms with their bank; localstripe charges and says so itself.
    data = urllib.parse.urlencode({"client_secret": intent.client_secret,
                                   "success": "true"}).encode()
    request = urllib.request.Request(
        f"{localstripe}/v1/payment_intents/{intent.id}/_authenticate", data=data,
        headers={"Authorization": f"Bearer {service.config.stripe_secret_key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    wait_until_live("sca-shop")
    assert client.v1.subscriptions.retrieve(sub.id).status == "active"


def test_account_page_and_the_billing_portal_localstripe_lacks(service, client):
    shop = Shop(service, "account-shop", "starter")
    shop.sign_up()
    with db_session:
        link = accounts.account_url(service.config, Customer.get(stripe_id=shop.customer)
                                    ).replace(service.config.public_url, service.url)
    with urllib.request.urlopen(link, timeout=10) as response:
        page = response.read().decode()
    assert "Account-Shop" in page and "Starter" in page and "£12" in page
    # Our page when Stripe cannot open a portal session (localstripe has no such API).
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(link + "billing", timeout=10)
    assert answer.value.code == 503
    assert "Stripe could not open your billing page" in answer.value.read().decode()


# -- pages in headless Chromium ------------------------------------------------

def test_signup_page_with_plans_and_the_account_page_in_chromium(service, browser):
    page = browser.new_page(viewport={"width": 420, "height": 900})
    page.goto(service.url + "/")
    plans = page.locator("label.plan")
    assert plans.count() == 3
    assert "Starter" in plans.nth(0).inner_text() and "£12" in plans.nth(0).inner_text()
    assert "14 days free" in plans.nth(1).inner_text()
    assert page.locator("input[name=plan][value=starter]").is_checked()
    page.locator("label.plan[data-plan=pro]").click()
    assert page.locator("input[name=plan][value=pro]").is_checked()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "signup-plans.png"), full_page=True)

    shop = Shop(service, "page-shop", "pro")
    shop.sign_up()
    with db_session:
        link = accounts.account_url(service.config, Customer.get(stripe_id=shop.customer)
                                    ).replace(service.config.public_url, service.url)
    page.goto(link)
    assert page.get_by_role("heading", name="Your eBuilder account").is_visible()
    assert page.locator(".plan-name").inner_text() == "Pro"
    assert page.locator("#billing").is_visible()
    page.screenshot(path=str(ARTIFACTS / "customer-account.png"), full_page=True)
    page.goto(link.replace("/account/", "/account/1"))  # another customer's number
    assert "not valid" in page.content()
    page.close()
    assert Path(ARTIFACTS / "customer-account.png").stat().st_size > 0
