"""Stripe event handlers: each records what the event tells us, then reconciles.

Adding a lifecycle event is adding a function decorated with `@handles`.
Handlers run in the worker inside one db_session; raising makes the event's
job retry.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime

from pony.orm import select

from provisioner import lifecycle, subdomains
from provisioner.config import Config
from provisioner.models import Customer, Instance, LogEntry, StripeEvent, Subscription, utcnow

Handler = Callable[[Config, dict], None]
HANDLERS: dict[str, Handler] = {}


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
        handler(config, payload["data"]["object"])
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


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, int | float) and value > 0:
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    return None


# -- the facts --------------------------------------------------------------

def subscription_for(stripe_id: str, stripe_customer_id: str | None) -> Subscription:
    subscription = Subscription.get(stripe_id=stripe_id)
    if subscription is None:
        subscription = Subscription(stripe_id=stripe_id)
    if stripe_customer_id and not subscription.stripe_customer_id:
        subscription.stripe_customer_id = stripe_customer_id
    if subscription.customer is None and stripe_customer_id:
        subscription.customer = Customer.get(stripe_id=stripe_customer_id)
    subscription.updated_at = utcnow()
    return subscription


def customer_for(stripe_customer_id: str | None, email: str) -> Customer:
    customer = Customer.get(stripe_id=stripe_customer_id) if stripe_customer_id else None
    if customer is None:
        customer = Customer(stripe_id=stripe_customer_id, email=email)
    elif email and customer.email != email:
        customer.email = email
    return customer


def free_port(config: Config, docker_host: str) -> int:
    used = set(select(i.port for i in Instance if i.live and i.docker_host == docker_host))
    for port in range(config.port_range_start, config.port_range_end + 1):
        if port not in used:
            return port
    raise EventError(
        f"no free port in {config.port_range_start}-{config.port_range_end} on {docker_host}"
    )


@handles("checkout.session.completed")
def checkout_completed(config: Config, session: dict) -> None:
    if Instance.get(checkout_session_id=session["id"]) is not None:
        return
    metadata = session.get("metadata") or {}
    details = session.get("customer_details") or {}
    email = details.get("email") or session.get("customer_email")
    if not email:
        raise EventError(f"checkout {session['id']} has no customer email")
    try:
        name = subdomains.validate_format(subdomains.normalise(metadata.get("subdomain", "")))
    except subdomains.InvalidSubdomain as exc:
        raise EventError(f"checkout {session['id']}: {exc}") from None
    if subdomains.is_taken(name):
        raise EventError(f"checkout {session['id']}: subdomain '{name}' is already taken")
    site_name = (metadata.get("site_name") or name).strip()[:200]
    stripe_customer_id = _id(session.get("customer"))
    customer = customer_for(stripe_customer_id, email)
    subscription = None
    subscription_id = _id(session.get("subscription"))
    if subscription_id:
        subscription = subscription_for(subscription_id, stripe_customer_id)
        subscription.customer = customer
        # Checkout completes with payment_status "paid" once the first invoice
        # is paid; "no_payment_required" covers trials and 100% coupons.
        if session.get("payment_status") in ("paid", "no_payment_required"):
            subscription.payment_confirmed = True
    instance = Instance(
        subdomain=name, site_name=site_name, admin_email=email,
        admin_password=secrets.token_urlsafe(12), customer=customer,
        subscription=subscription, checkout_session_id=session["id"],
        port=free_port(config, "localhost"), docker_host="localhost",
    )
    LogEntry(instance=instance, message=f"checkout {session['id']} completed for {email}")
    lifecycle.reconcile(instance)


@handles("invoice.paid", "invoice.payment_succeeded")
def invoice_paid(config: Config, invoice: dict) -> None:
    subscription_id = invoice_subscription_id(invoice)
    if subscription_id is None:
        return  # a one-off invoice: nothing to provision
    subscription = subscription_for(subscription_id, _id(invoice.get("customer")))
    subscription.payment_confirmed = True
    for line in (invoice.get("lines") or {}).get("data") or []:
        period = line.get("period") or {}
        subscription.current_period_start = _timestamp(period.get("start")) or \
            subscription.current_period_start
        subscription.current_period_end = _timestamp(period.get("end")) or \
            subscription.current_period_end
    for instance in subscription.instances.select(lambda i: i.live):
        LogEntry(instance=instance, message=f"invoice {invoice.get('id')} paid")
        lifecycle.reconcile(instance)
