"""Stripe event handlers: each records what the event tells us, then reconciles.

Adding a lifecycle event is adding a function decorated with `@handles`.
Handlers run in the worker inside one db_session; raising makes the event's
job retry. Subscription facts carry the time Stripe created the event, and an
older snapshot never overwrites a newer one, so delivery order does not matter.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pony.orm import flush, select

from provisioner import docker_hosts, lifecycle, subdomains
from provisioner.config import Config
from provisioner.models import (
    Customer,
    Instance,
    LogEntry,
    StripeEvent,
    SubdomainHold,
    Subscription,
    utcnow,
)

log = logging.getLogger(__name__)
Handler = Callable[[Config, dict, datetime], None]
HANDLERS: dict[str, Handler] = {}

# When two snapshots carry the same second, the later stage of a
# subscription's life wins, whatever order they were applied in.
STATUS_RANK = {None: 0, "incomplete": 1, "trialing": 2, "active": 3, "past_due": 4,
               "unpaid": 5, "paused": 5, "incomplete_expired": 6, "canceled": 7}


class EventError(Exception):
    """The event cannot be applied as it stands (retried, then visible as failed)."""


def handles(*types: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        for event_type in types:
            HANDLERS[event_type] = func
        return func

    return register


def apply(config: Config, event: StripeEvent) -> None:
    """Apply a stored event (needs a db_session). Unknown types are recorded and ignored."""
    payload = json.loads(event.payload)
    handler = HANDLERS.get(event.type)
    if handler is not None:
        at = _timestamp(payload.get("created")) or event.received_at
        handler(config, payload["data"]["object"], at)
    event.processed_at = utcnow()
    event.failed_at = None
    event.error = None


# -- reading Stripe's shapes ------------------------------------------------

def _id(value: object) -> str | None:
    """Stripe fields hold either an id or an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def invoice_subscription_id(invoice: dict) -> str | None:
    """The subscription of an invoice, in the old or the current API shape."""
    old = _id(invoice.get("subscription"))
    if old:
        return old
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    new = _id(details.get("subscription"))
    if new:
        return new
    for line in (invoice.get("lines") or {}).get("data") or []:
        line_parent = (line.get("parent") or {}).get("subscription_item_details") or {}
        found = _id(line.get("subscription")) or _id(line_parent.get("subscription"))
        if found and found.startswith("sub_"):
            return found
    return None


def subscription_period(sub: dict) -> tuple[datetime | None, datetime | None]:
    """Current period from the subscription (old shape) or its first item (current shape)."""
    start, end = sub.get("current_period_start"), sub.get("current_period_end")
    if not start or not end:
        items = (sub.get("items") or {}).get("data") or []
        if items:
            start = start or items[0].get("current_period_start")
            end = end or items[0].get("current_period_end")
    return _timestamp(start), _timestamp(end)


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    return None


# -- the facts --------------------------------------------------------------

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
    subscription = subscription_for(sub["id"], _id(sub.get("customer")))
    if set_status(subscription, sub.get("status"), at):
        start, end = subscription_period(sub)
        subscription.current_period_start = start or subscription.current_period_start
        subscription.current_period_end = end or subscription.current_period_end
        subscription.cancel_at = _timestamp(sub.get("cancel_at"))
        subscription.canceled_at = _timestamp(sub.get("canceled_at")) or \
            _timestamp(sub.get("ended_at"))
    return subscription


def reconcile_all(config: Config, subscription: Subscription) -> None:
    for instance in subscription.instances.select(lambda i: i.live):
        lifecycle.reconcile(instance, config)


def free_port(config: Config) -> int:
    """The lowest port no live store has, on any host: hosts may share a loopback."""
    used = set(select(i.port for i in Instance if i.live))
    for port in range(config.port_range_start, config.port_range_end + 1):
        if port not in used:
            return port
    raise EventError(f"no free port in {config.port_range_start}-{config.port_range_end}")


def refresh_unknown_customer(config: Config, stripe_customer_id: str | None) -> None:
    """An event for a customer we never saw: re-read their subscriptions from Stripe."""
    if not stripe_customer_id or not config.stripe_secret_key:
        return
    if Customer.get(stripe_id=stripe_customer_id) is not None:
        return
    if Subscription.select(lambda s: s.stripe_customer_id == stripe_customer_id).exists():
        return
    from provisioner import stripe_sync

    try:
        stripe_sync.refresh_customer(config, stripe_customer_id)
    except stripe_sync.StripeUnavailable as exc:
        # The event itself still counts; the API was only a second opinion.
        log.warning("could not re-read customer %s from Stripe: %s", stripe_customer_id, exc)


# -- the handlers -----------------------------------------------------------

@handles("checkout.session.completed")
def checkout_completed(config: Config, session: dict, at: datetime) -> None:
    if Instance.get(checkout_session_id=session["id"]) is not None:
        return
    metadata = session.get("metadata") or {}
    details = session.get("customer_details") or {}
    email = details.get("email") or session.get("customer_email") or ""
    stripe_customer_id = _id(session.get("customer"))
    subscription_id = _id(session.get("subscription"))
    raw_name = metadata.get("subdomain") if isinstance(metadata.get("subdomain"), str) else ""
    site_name = str(metadata.get("site_name") or raw_name or "").strip()[:200] or "eBuilder store"
    customer = customer_for(stripe_customer_id, email or "unknown")
    subscription = None
    if subscription_id:
        subscription = subscription_for(subscription_id, stripe_customer_id)
        subscription.customer = customer
        # "paid" once the first invoice is paid; "no_payment_required" for
        # trials and 100% coupons.
        if session.get("payment_status") in ("paid", "no_payment_required"):
            subscription.payment_confirmed = True
    hold = SubdomainHold.get(checkout_session_id=session["id"])
    if hold is not None:
        hold.delete()

    problem = None
    name = ""
    try:
        name = subdomains.validate_format(subdomains.normalise(raw_name))
    except subdomains.InvalidSubdomain as exc:
        problem = f"checkout {session['id']} has no usable subdomain: {exc}"
    if not email:
        problem = f"checkout {session['id']} has no customer email"
    existing = subdomains.holder(name) if name else None
    if problem is None and existing is not None:
        if _same_customer(existing, stripe_customer_id, email) and \
                existing.desired_state == lifecycle.CANCELLED:
            _resubscribe(config, existing, session, subscription, customer)
            return
        problem = f"subdomain '{name}' was taken before checkout {session['id']} completed"
    if problem is None and subdomains.is_held(name, except_session=session["id"]):
        problem = f"subdomain '{name}' is held by another open checkout"

    instance = Instance(
        subdomain=name or (raw_name or "(none)")[:100], site_name=site_name,
        admin_email=email or "unknown", admin_password=secrets.token_urlsafe(12),
        customer=customer, subscription=subscription, checkout_session_id=session["id"],
        port=0 if problem else free_port(config),
        docker_host="-" if problem else docker_hosts.place(config),
    )
    if problem:
        lifecycle.needs_attention(instance, problem)
        return
    LogEntry(instance=instance, message=f"checkout {session['id']} completed for {email}")
    lifecycle.reconcile(instance, config)


def _same_customer(instance: Instance, stripe_customer_id: str | None, email: str) -> bool:
    if stripe_customer_id and instance.customer and instance.customer.stripe_id == \
            stripe_customer_id:
        return True
    return bool(email) and instance.admin_email.lower() == email.lower()


def _resubscribe(config: Config, instance: Instance, session: dict,
                 subscription: Subscription | None, customer: Customer) -> None:
    """A cancelled store's customer paid again: same store, same data."""
    instance.subscription = subscription
    instance.customer = customer
    instance.checkout_session_id = session["id"]
    instance.delete_after = None
    LogEntry(instance=instance, message=f"re-subscribed through checkout {session['id']}")
    lifecycle.reconcile(instance, config)


@handles("checkout.session.expired")
def checkout_expired(config: Config, session: dict, at: datetime) -> None:
    hold = SubdomainHold.get(checkout_session_id=session["id"])
    if hold is not None:
        hold.delete()


@handles("customer.subscription.created", "customer.subscription.updated",
         "customer.subscription.deleted", "customer.subscription.paused",
         "customer.subscription.resumed")
def subscription_changed(config: Config, sub: dict, at: datetime) -> None:
    refresh_unknown_customer(config, _id(sub.get("customer")))
    reconcile_all(config, apply_subscription(config, sub, at))


@handles("invoice.paid", "invoice.payment_succeeded")
def invoice_paid(config: Config, invoice: dict, at: datetime) -> None:
    subscription_id = invoice_subscription_id(invoice)
    if subscription_id is None:
        return  # a one-off invoice: nothing to provision
    refresh_unknown_customer(config, _id(invoice.get("customer")))
    subscription = subscription_for(subscription_id, _id(invoice.get("customer")))
    subscription.payment_confirmed = True
    # A paid invoice means the subscription is in good standing as of now,
    # unless it has ended.
    if subscription.status not in lifecycle.ENDED_STATUSES:
        set_status(subscription, "active", at)
    for line in (invoice.get("lines") or {}).get("data") or []:
        period = line.get("period") or {}
        subscription.current_period_start = _timestamp(period.get("start")) or \
            subscription.current_period_start
        subscription.current_period_end = _timestamp(period.get("end")) or \
            subscription.current_period_end
    reconcile_all(config, subscription)


@handles("invoice.payment_failed")
def invoice_payment_failed(config: Config, invoice: dict, at: datetime) -> None:
    subscription_id = invoice_subscription_id(invoice)
    if subscription_id is None:
        return
    refresh_unknown_customer(config, _id(invoice.get("customer")))
    subscription = subscription_for(subscription_id, _id(invoice.get("customer")))
    if subscription.status in lifecycle.ENDED_STATUSES:
        return
    # A renewal that failed makes Stripe mark the subscription past_due; a
    # first payment that failed leaves it incomplete (nothing was ever paid).
    set_status(subscription, "past_due" if subscription.payment_confirmed else "incomplete", at)
    reconcile_all(config, subscription)


def hold_subdomain(name: str, session_id: str, email: str, expires_at: int | None) -> None:
    """Promise `name` to an open checkout until it completes or expires (needs a db_session)."""
    until = _timestamp(expires_at) or utcnow() + timedelta(hours=24)
    for stale in SubdomainHold.select(lambda h: h.subdomain == name):
        stale.delete()
    flush()
    SubdomainHold(subdomain=name, checkout_session_id=session_id, email=email, expires_at=until)
