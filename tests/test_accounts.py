"""The customer's page behind a signed, expiring link, and the way to Stripe's Customer
Portal. localstripe has no /v1/billing_portal/sessions (tests/integration/
test_plans_live.py shows our page when Stripe cannot open one); here
tests/stripe_stub.py answers that one endpoint with Stripe's own fixture object and
records what we sent."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

import pytest
from pony.orm import db_session, flush

from provisioner import accounts, lifecycle, notifications
from provisioner.models import Customer, Instance, Subscription, utcnow
from provisioner.web import create_app
from tests.stripe_stub import StripeStub
from tests.wsgi import call


@pytest.fixture
def customer_id(config) -> int:
    with db_session:
        customer = Customer(stripe_id="cus_acc1", email="jane@example.com")
        subscription = Subscription(stripe_id="sub_acc1", customer=customer, status="past_due",
                                    past_due_since=utcnow() - timedelta(days=2),
                                    current_period_end=utcnow() + timedelta(days=20))
        Instance(subdomain="jane-shop", site_name="Jane <b>Shop</b>", admin_email=customer.email,
                 port=19150, customer=customer, subscription=subscription, status="running",
                 provisioned_at=utcnow())
        Instance(subdomain="other-shop", site_name="Not Jane's", admin_email="o@example.com",
                 port=19151, customer=Customer(email="o@example.com"), status="running")
        flush()
        return customer.id


def link_for(customer_id: int, days: float = 1) -> str:
    return accounts.token(customer_id, utcnow() + timedelta(days=days))


def page(app, path: str) -> tuple[int, str, dict]:
    status, body, headers = call(app, "GET", path, raw=True)
    return status, body.decode(), headers


def test_a_link_verifies_only_as_signed_and_until_it_expires(config, customer_id):
    link = link_for(customer_id)
    assert accounts.verify(link) == customer_id
    number, expires, signature = link.split(".")
    for forged in (f"{int(number) + 1}.{expires}.{signature}",
                   f"{number}.{int(expires) + 86400}.{signature}",
                   f"{number}.{expires}.{signature[:-2]}AA", "1.2", "", "x" * 500):
        with pytest.raises(accounts.InvalidLink, match="not valid"):
            accounts.verify(forged)
    with pytest.raises(accounts.InvalidLink, match="expired"):
        accounts.verify(link, now=time.time() + 2 * 86400)


def test_the_account_page_shows_only_the_customers_own_stores(config, customer_id):
    app = create_app(config)
    status, html, headers = page(app, f"/account/{link_for(customer_id)}/")
    assert status == 200
    assert "Jane &lt;b&gt;Shop&lt;/b&gt;" in html and "Not Jane" not in html
    assert "https://jane-shop.stores.test" in html
    assert "did not go through" in html  # past due: the grace's end is shown
    assert "/billing" in html
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "same-origin"


def test_a_bad_or_expired_link_is_403_and_says_why(config, customer_id):
    app = create_app(config)
    status, html, headers = page(app, f"/account/{link_for(customer_id, days=-1)}/")
    assert status == 403 and "expired" in html
    assert headers["Cache-Control"] == "no-store" and "nonce-" in \
        headers["Content-Security-Policy"]
    status, html, _ = page(app, f"/account/{customer_id}.9999999999.forged/")
    assert status == 403 and "not valid" in html and "Jane" not in html
    status, html, _ = page(app, f"/account/{customer_id}.9999999999.%C3%A9/")
    assert status == 403 and "not valid" in html


def test_an_account_link_never_reaches_the_log(config, customer_id, caplog, monkeypatch):
    from provisioner.web import account

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(account.accounts, "view", broken)
    link = link_for(customer_id)
    status, _, _ = page(create_app(config), f"/account/{link}/")
    assert status == 500
    assert "/account/<link>/" in caplog.text and link not in caplog.text


def test_billing_opens_a_fresh_portal_session_for_this_customer(config, customer_id):
    stub = StripeStub("billing_portal.session",
                      id="bps_test_1", url="https://billing.stripe.com/p/session/test_1")
    try:
        stripe_config = dataclasses.replace(config, stripe_secret_key="sk_test_" + "k" * 20,
                                            stripe_api_base=stub.url)
        app = create_app(stripe_config)
        link = link_for(customer_id)
        status, _, headers = page(app, f"/account/{link}/billing")
        assert status == 303
        assert headers["Location"] == "https://billing.stripe.com/p/session/test_1"
        (sent,) = stub.requests
        assert sent["path"] == "/v1/billing_portal/sessions"
        assert sent["form"] == {"customer": "cus_acc1",
                                "return_url": f"{config.public_url}/account/{link}/"}
        assert sent["auth"] == f"Bearer {stripe_config.stripe_secret_key}"
    finally:
        stub.close()


def test_billing_without_stripe_is_a_page_that_says_so(config, customer_id):
    status, html, headers = page(create_app(config), f"/account/{link_for(customer_id)}/billing")
    assert status == 503 and "not available right now" in html
    assert headers["Retry-After"] == "60"


@pytest.mark.parametrize("notice", ["payment_warning", "suspended", "closed", "trial_ending",
                                    "payment_action"])
def test_customer_emails_carry_the_account_and_billing_links(config, customer_id, notice):
    with db_session:
        instance = Instance.get(subdomain="jane-shop")
        lifecycle.notify(instance, notice)
        outgoing = notifications.prepare(config, instance, notice)
        text = outgoing.message.get_body(("plain",)).get_content()
        html = outgoing.message.get_body(("html",)).get_content()
    assert "/billing" in text and "/billing" in html
    link = text.split(f"{config.public_url}/account/")[1].split("/")[0]
    assert accounts.verify(link) == customer_id
    # Escaped where it is HTML, never a template.
    assert "Jane <b>Shop</b>" in text and "Jane &lt;b&gt;Shop&lt;/b&gt;" in html


@pytest.mark.parametrize("notice", ["admin_dispute", "admin_plan_refused"])
def test_admin_notices_render_in_text_and_html(config, customer_id, notice):
    admins = dataclasses.replace(config, admin_notify_email="ops@example.com")
    with db_session:
        instance = Instance.get(subdomain="jane-shop")
        instance.plan_problem = "uses 600 MiB <script>"
        outgoing = notifications.prepare(admins, instance, notice, detail="dispute du_1 <x>")
        text = outgoing.message.get_body(("plain",)).get_content()
        html = outgoing.message.get_body(("html",)).get_content()
    assert outgoing.recipient == "ops@example.com"
    assert "jane-shop" in text and "/admin/instances/" in html
    assert "<script>" not in html and "<x>" not in html
