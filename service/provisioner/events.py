"""Stripe event handlers: each records what the event tells us (billing.py),
then reconciles the stores it concerns (lifecycle.py).

Adding a lifecycle event is adding a function decorated with `@handles`.
Handlers run in the worker inside one db_session; raising makes the event's
job retry.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from datetime import datetime

from provisioner import docker_hosts, jobs, lifecycle, stripe_sync, subdomains
from provisioner.billing import (
    apply_subscription,
    customer_for,
    reconcile_all,
    set_status,
    subscription_for,
)
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
from provisioner.states import JobKind
from provisioner.stripe_shapes import invoice_subscription_id, object_id, timestamp

log = logging.getLogger(__name__)
Handler = Callable[[Config, dict, datetime], None]
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
        at = timestamp(payload.get("created")) or event.received_at
        handler(config, payload["data"]["object"], at)
    event.processed_at = utcnow()
    event.failed_at = None
    event.error = None


def replay(event: StripeEvent, by: str) -> None:
    """Apply a recorded event again (needs a db_session): handlers only record facts and
    reconcile, so a replay is safe; older snapshots never overwrite newer ones."""
    LogEntry(message=f"event {event.stripe_id} ({event.type}) replayed by {by}")
    event.processed_at = None
    event.failed_at = None
    jobs.enqueue(JobKind.EVENT, event=event)


def refresh_unknown_customer(config: Config, stripe_customer_id: str | None) -> None:
    """An event for a customer we never saw: re-read their subscriptions from Stripe."""
    if not stripe_customer_id or not config.stripe_secret_key:
        return
    if Customer.get(stripe_id=stripe_customer_id) is not None:
        return
    if Subscription.select(lambda s: s.stripe_customer_id == stripe_customer_id).exists():
        return
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
    stripe_customer_id = object_id(session.get("customer"))
    subscription_id = object_id(session.get("subscription"))
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
        port=0 if problem else docker_hosts.free_port(config),
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
    refresh_unknown_customer(config, object_id(sub.get("customer")))
    reconcile_all(config, apply_subscription(config, sub, at))


@handles("invoice.paid", "invoice.payment_succeeded")
def invoice_paid(config: Config, invoice: dict, at: datetime) -> None:
    subscription_id = invoice_subscription_id(invoice)
    if subscription_id is None:
        return  # a one-off invoice: nothing to provision
    refresh_unknown_customer(config, object_id(invoice.get("customer")))
    subscription = subscription_for(subscription_id, object_id(invoice.get("customer")))
    subscription.payment_confirmed = True
    # A paid invoice means the subscription is in good standing as of now,
    # unless it has ended.
    if subscription.status not in lifecycle.ENDED_STATUSES:
        set_status(subscription, "active", at)
    for line in (invoice.get("lines") or {}).get("data") or []:
        period = line.get("period") or {}
        subscription.current_period_start = timestamp(period.get("start")) or \
            subscription.current_period_start
        subscription.current_period_end = timestamp(period.get("end")) or \
            subscription.current_period_end
    reconcile_all(config, subscription)


@handles("invoice.payment_failed")
def invoice_payment_failed(config: Config, invoice: dict, at: datetime) -> None:
    subscription_id = invoice_subscription_id(invoice)
    if subscription_id is None:
        return
    refresh_unknown_customer(config, object_id(invoice.get("customer")))
    subscription = subscription_for(subscription_id, object_id(invoice.get("customer")))
    if subscription.status in lifecycle.ENDED_STATUSES:
        return
    # A renewal that failed makes Stripe mark the subscription past_due; a
    # first payment that failed leaves it incomplete (nothing was ever paid).
    set_status(subscription, "past_due" if subscription.payment_confirmed else "incomplete", at)
    reconcile_all(config, subscription)
