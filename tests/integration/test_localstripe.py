"""End to end against localstripe: it creates subscriptions and sends its own signed events."""

from __future__ import annotations

import time
import urllib.parse
import urllib.request

import pytest
import stripe
from pony.orm import db_session, select

from provisioner.models import Instance, StripeEvent, Subscription
from provisioner.testing import stripe_events
from tests.conftest import WEBHOOK_SECRET
from tests.integration.conftest import inspect, poll, wait_until_live


def register_webhook(localstripe: str, url: str) -> None:
    data = urllib.parse.urlencode({"url": url, "secret": WEBHOOK_SECRET}).encode()
    request = urllib.request.Request(f"{localstripe}/_config/webhooks/provisioner", data=data,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def paying_customer(client: stripe.StripeClient, email: str):
    """A customer with a card and an active £12/month subscription, made in localstripe."""
    product = client.v1.products.create(params={"name": "eBuilder store"})
    plan = client.v1.plans.create(params={"product": product.id, "amount": 1200,
                                          "currency": "gbp", "interval": "month"})
    token = client.v1.tokens.create(params={"card": {
        "number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}})
    customer = client.v1.customers.create(params={"email": email, "source": token.id})
    subscription = client.v1.subscriptions.create(
        params={"customer": customer.id, "items": [{"plan": plan.id}]})
    return customer, subscription


@pytest.fixture
def webhook(service, localstripe):
    """localstripe delivers to the service for the length of one test."""
    register_webhook(localstripe, service.url + "/api/webhook/stripe/")
    yield
    # localstripe cannot delete a webhook: point it at a closed port instead.
    register_webhook(localstripe, "http://127.0.0.1:9/")


def test_localstripe_subscription_provisions_and_its_cancellation_stops_the_store(
        service, localstripe, webhook):
    client = stripe.StripeClient(service.config.stripe_secret_key,
                                 base_addresses={"api": localstripe})
    customer, subscription = paying_customer(client, "ls@example.com")
    assert subscription.status == "active"

    def delivered(*types):
        with db_session:
            got = set(select(e.type for e in StripeEvent if e.processed_at is not None))
            return set(types) <= got
    poll(lambda: delivered("customer.subscription.created", "invoice.payment_succeeded"),
         timeout=60, what="localstripe's signed events")
    with db_session:
        assert Subscription.get(stripe_id=subscription.id).status == "active"

    # localstripe has no Checkout Sessions: that one event we send ourselves.
    session = stripe_events.checkout_session(
        subdomain="localstripe-shop", site_name="LS", email="ls@example.com",
        customer=customer.id, subscription=subscription.id, payment_status="paid")
    started = time.perf_counter()
    service.post_event(stripe_events.event("checkout.session.completed", session))
    wait_until_live("localstripe-shop")
    print(f"\nlocalstripe checkout -> live store: {time.perf_counter() - started:.2f} s")
    assert inspect("ebuilder_localstripe-shop")["State"]["Running"]

    client.v1.subscriptions.cancel(subscription.id)

    def stopped():
        with db_session:
            return Instance.get(subdomain="localstripe-shop").status == "cancelled"
    poll(stopped, timeout=120, what="the store to be cancelled")
    assert not inspect("ebuilder_localstripe-shop")["State"]["Running"]
    with db_session:
        assert StripeEvent.get(type="customer.subscription.deleted") is not None


def test_event_for_an_unknown_customer_is_reconciled_from_stripe(service, localstripe):
    client = stripe.StripeClient(service.config.stripe_secret_key,
                                 base_addresses={"api": localstripe})
    customer, subscription = paying_customer(client, "unknown@example.com")
    # An invoice event is all we get (others lost); the customer is new to us.
    invoice = stripe_events.invoice(customer=customer.id, subscription="sub_other",
                                    status="open")
    service.post_event(stripe_events.event("invoice.payment_failed", invoice))

    def reconciled():
        with db_session:
            sub = Subscription.get(stripe_id=subscription.id)
            return sub is not None and sub.status == "active" and sub.customer is not None \
                and sub.customer.email == "unknown@example.com"
    poll(reconciled, timeout=60, what="the customer's subscriptions re-read from localstripe")
