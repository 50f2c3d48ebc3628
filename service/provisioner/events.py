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

from pony.orm import desc

from provisioner import docker_hosts, jobs, lifecycle, plans, stripe_sync, subdomains
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
# A handler may return the Stripe customer the event concerns when the object does not
# name it (a dispute names a charge): the event is then listed on that customer's page.
Handler = Callable[[Config, dict, datetime], str | None]
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
    obj = payload["data"]["object"]
    customer = None
    if handler is not None:
        at = timestamp(payload.get("created")) or event.received_at
        customer = handler(config, obj, at)
    event.stripe_customer_id = customer or object_id(obj.get("customer")) or \
        event.stripe_customer_id
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

    chosen = plans.by_key(config, metadata.get("plan")) if metadata.get("plan") in \
        {p.key for p in plans.all_plans(config)} else plans.default(config)
    instance = Instance(
        subdomain=name or (raw_name or "(none)")[:100], site_name=site_name,
        plan_price_id=chosen.price_id,
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


@handles("customer.subscription.trial_will_end")
def trial_will_end(config: Config, sub: dict, at: datetime) -> None:
    """Three days before a trial ends: remind the customer that the first charge comes."""
    refresh_unknown_customer(config, object_id(sub.get("customer")))
    subscription = apply_subscription(config, sub, at)
    ends = subscription.trial_end
    # Late, after the trial was paid or cancelled: nothing to remind of.
    if subscription.status == "trialing" and ends is not None and ends > utcnow():
        for instance in subscription.instances.select(lambda i: i.live):
            lifecycle.notify(instance, "trial_ending", key=ends.isoformat(timespec="seconds"))
    reconcile_all(config, subscription)


@handles("invoice.payment_action_required")
def payment_action_required(config: Config, invoice: dict, at: datetime) -> None:
    """The bank wants the customer to confirm (SCA): email them the invoice's page. A
    renewal counts as past due, so the store stays up through the usual grace."""
    subscription_id = invoice_subscription_id(invoice)
    if subscription_id is None:
        return
    refresh_unknown_customer(config, object_id(invoice.get("customer")))
    subscription = subscription_for(subscription_id, object_id(invoice.get("customer")))
    if subscription.status in lifecycle.ENDED_STATUSES:
        return
    if subscription.payment_confirmed:
        set_status(subscription, "past_due", at)
    url = invoice.get("hosted_invoice_url")
    link = url if isinstance(url, str) and url.startswith("https://") else ""
    for instance in subscription.instances.select(lambda i: i.live):
        LogEntry(instance=instance, message=f"invoice {invoice.get('id')} needs the "
                                            f"customer to confirm the payment")
        lifecycle.notify(instance, "payment_action", key=str(invoice.get("id") or "-"),
                         text=link)
    reconcile_all(config, subscription)


def _dispute_customer(config: Config, dispute: dict) -> Customer | None:
    """Whose charge is disputed: the expanded charge, Stripe's API, or the email the
    dispute's evidence names."""
    charge = dispute.get("charge")
    stripe_customer_id = object_id(charge.get("customer")) if isinstance(charge, dict) \
        else None
    if stripe_customer_id is None and object_id(charge) and config.stripe_secret_key:
        try:
            stripe_customer_id = stripe_sync.charge_customer(config, object_id(charge))
        except stripe_sync.StripeUnavailable as exc:
            # Retried: a dispute must not go unnoticed because Stripe's API hiccuped.
            raise EventError(f"cannot read disputed charge {object_id(charge)} from "
                             f"Stripe: {exc}") from None
    if stripe_customer_id:
        return Customer.get(stripe_id=stripe_customer_id)
    email = ((dispute.get("evidence") or {}).get("customer_email_address") or "").strip()
    return Customer.select(lambda c: c.email == email).first() if email else None


@handles("charge.dispute.created", "charge.dispute.closed")
def dispute(config: Config, obj: dict, at: datetime) -> str | None:
    """A customer disputed a charge with their bank: the admin hears of it; the store is
    left as it is (billing decides, not the dispute)."""
    customer = _dispute_customer(config, obj)
    amount = obj.get("amount") if isinstance(obj.get("amount"), int) else 0
    currency = str(obj.get("currency") or "").upper()
    text = (f"dispute {obj.get('id')} of {amount / 100:.2f} {currency}, reason "
            f"{obj.get('reason') or 'unknown'}, status {obj.get('status') or 'unknown'}")
    opened = obj.get("status") not in ("won", "lost", "warning_closed")
    if customer is None:
        LogEntry(level="warning", message=f"{text}: no customer of ours found")
        return None
    # Disputes often come after a store was closed: its newest store carries the alert.
    stores = customer.instances.select(lambda i: i.live)[:] or \
        customer.instances.select().order_by(desc(Instance.id))[:1]
    for instance in stores:
        LogEntry(instance=instance, level="warning" if opened else "info", message=text)
        if opened:
            lifecycle.notify(instance, "admin_dispute", key=str(obj.get("id") or "-"),
                             text=text)
    return customer.stripe_id
