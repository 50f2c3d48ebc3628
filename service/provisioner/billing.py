"""What we know about customers and subscriptions, recorded from Stripe's snapshots.

Subscription facts carry the time Stripe created the event, and an older
snapshot never overwrites a newer one, so delivery order does not matter.
"""

from __future__ import annotations

from datetime import datetime

from provisioner import lifecycle
from provisioner.config import Config
from provisioner.models import Customer, LogEntry, Subscription, utcnow
from provisioner.stripe_shapes import (
    object_id,
    subscription_period,
    subscription_price,
    timestamp,
)

# When two snapshots carry the same second, the later stage of a
# subscription's life wins, whatever order they were applied in.
STATUS_RANK = {None: 0, "incomplete": 1, "trialing": 2, "active": 3, "past_due": 4,
               "unpaid": 5, "paused": 5, "incomplete_expired": 6, "canceled": 7}



def subscription_for(stripe_id: str, stripe_customer_id: str | None) -> Subscription:
    subscription = Subscription.get(stripe_id=stripe_id)
    if subscription is None:
        subscription = Subscription(stripe_id=stripe_id)
    if stripe_customer_id and not subscription.stripe_customer_id:
        subscription.stripe_customer_id = stripe_customer_id
    if subscription.customer is None and subscription.stripe_customer_id:
        subscription.customer = Customer.get(stripe_id=subscription.stripe_customer_id)
    subscription.updated_at = utcnow()
    return subscription


def customer_for(stripe_customer_id: str | None, email: str) -> Customer:
    customer = Customer.get(stripe_id=stripe_customer_id) if stripe_customer_id else None
    if customer is None:
        customer = Customer(stripe_id=stripe_customer_id, email=email)
    elif email and customer.email != email:
        customer.email = email
    return customer


def set_status(subscription: Subscription, status: str | None, at: datetime) -> bool:
    """Take `status` as of `at` unless we already know something newer; True if taken."""
    known = subscription.status_at
    if known is not None and (at < known or (
            at == known and STATUS_RANK.get(status, 0) < STATUS_RANK.get(subscription.status, 0))):
        return False
    if status == "past_due" and subscription.status != "past_due":
        subscription.past_due_since = at
    elif status != "past_due":
        subscription.past_due_since = None
    subscription.status = status
    subscription.status_at = at
    if status in ("active", "trialing"):
        subscription.payment_confirmed = True
    return True


def apply_subscription(config: Config, sub: dict, at: datetime) -> Subscription:
    """Record a subscription snapshot (from an event or from the Stripe API)."""
    subscription = subscription_for(sub["id"], object_id(sub.get("customer")))
    if set_status(subscription, sub.get("status"), at):
        start, end = subscription_period(sub)
        subscription.current_period_start = start or subscription.current_period_start
        subscription.current_period_end = end or subscription.current_period_end
        subscription.cancel_at = timestamp(sub.get("cancel_at"))
        # When it ended (a cancellation at the period's end is asked for earlier).
        subscription.canceled_at = timestamp(sub.get("ended_at")) or \
            timestamp(sub.get("canceled_at"))
    if subscription.snapshot_at is None or at >= subscription.snapshot_at:
        subscription.snapshot_at = at
        subscription.trial_end = timestamp(sub.get("trial_end"))
        price_id, monthly, currency = subscription_price(sub)
        if price_id and price_id != subscription.price_id:
            for instance in subscription.instances.select(lambda i: i.live):
                if subscription.price_id:
                    LogEntry(instance=instance, message=f"subscription's price changed "
                                                        f"{subscription.price_id} -> {price_id}")
                # A new change replaces one refused or forced before it.
                instance.plan_refused = instance.plan_problem = None
                instance.plan_force = False
            subscription.price_id = price_id
        if monthly is not None:
            subscription.monthly_amount = monthly
            subscription.currency = currency or subscription.currency
    return subscription


def reconcile_all(config: Config, subscription: Subscription) -> None:
    for instance in subscription.instances.select(lambda i: i.live):
        lifecycle.reconcile(instance, config)
