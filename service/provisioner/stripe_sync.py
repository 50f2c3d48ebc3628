"""Re-reading the truth from Stripe's API, for customers our events never told us about."""

from __future__ import annotations

import stripe

from provisioner import billing
from provisioner.checkout import CheckoutUnavailable, stripe_client
from provisioner.config import Config
from provisioner.models import utcnow


class StripeUnavailable(Exception):
    """No key configured, or Stripe did not answer."""


def refresh_customer(config: Config, stripe_customer_id: str) -> int:
    """Apply the customer's current subscriptions (needs a db_session); return how many."""
    try:
        client = stripe_client(config)
        customer = client.v1.customers.retrieve(stripe_customer_id)
        listing = client.v1.subscriptions.list(params={"customer": stripe_customer_id,
                                                       "status": "all", "limit": 100})
    except (CheckoutUnavailable, stripe.StripeError) as exc:
        raise StripeUnavailable(str(exc)) from None
    email = customer.to_dict().get("email") or ""
    billing.customer_for(stripe_customer_id, email)
    now = utcnow()
    count = 0
    for sub in listing.data:
        subscription = billing.apply_subscription(config, sub.to_dict(), now)
        billing.reconcile_all(config, subscription)
        count += 1
    return count


def charge_customer(config: Config, charge_id: str) -> str | None:
    """The Stripe customer a charge was made to (a dispute names only the charge)."""
    try:
        charge = stripe_client(config).v1.charges.retrieve(charge_id)
    except (CheckoutUnavailable, stripe.StripeError) as exc:
        raise StripeUnavailable(str(exc)) from None
    customer = charge.to_dict().get("customer")
    return customer if isinstance(customer, str) else None
