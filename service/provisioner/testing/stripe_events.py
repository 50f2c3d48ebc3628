"""Webhook payloads built on Stripe's own fixture objects, and their signatures.

`fixtures3.json` is Stripe's published fixture set (stripe/openapi, MIT, see
LICENSE beside it): payloads here are copies of real object shapes with our
ids, metadata and statuses laid over them.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from functools import cache
from pathlib import Path

import stripe

API_VERSION = "2025-03-31.basil"


@cache
def _resources() -> dict:
    return json.loads((Path(__file__).parent / "fixtures3.json").read_text())["resources"]


def resource(name: str) -> dict:
    return copy.deepcopy(_resources()[name])


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def event(event_type: str, obj: dict, event_id: str | None = None) -> dict:
    evt = resource("event")
    evt.update(id=event_id or new_id("evt"), type=event_type, created=int(time.time()),
               api_version=API_VERSION, data={"object": obj})
    return evt


def checkout_session(*, subdomain: str, site_name: str, email: str, customer: str,
                     subscription: str, payment_status: str = "paid",
                     use_customer_email: bool = False) -> dict:
    session = resource("checkout.session")
    session.update(
        id=new_id("cs_test"), mode="subscription", status="complete",
        payment_status=payment_status, customer=customer, subscription=subscription,
        metadata={"subdomain": subdomain, "site_name": site_name}, payment_intent=None,
    )
    if use_customer_email:
        session["customer_details"] = None
        session["customer_email"] = email
    else:
        session["customer_details"]["email"] = email
        session["customer_email"] = None
    return session


def invoice(*, customer: str, subscription: str, status: str = "paid",
            old_shape: bool = False) -> dict:
    """An invoice naming its subscription the current way, or the pre-2025 way."""
    inv = resource("invoice")
    now = int(time.time())
    inv.update(id=new_id("in"), customer=customer, status=status, billing_reason=
               "subscription_create", amount_due=1200, amount_paid=1200 if status == "paid" else 0,
               currency="gbp")
    line = inv["lines"]["data"][0]
    line["period"] = {"start": now, "end": now + 30 * 86400}
    if old_shape:
        inv["subscription"] = subscription
        inv["parent"] = None
    else:
        inv.pop("subscription", None)
        inv["parent"] = {"type": "subscription_details", "quote_details": None,
                         "subscription_details": {"metadata": {}, "subscription": subscription}}
    return inv


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        payload.decode("utf-8"), secret, timestamp=timestamp)


def encode(evt: dict) -> bytes:
    return json.dumps(evt).encode("utf-8")


def signup(*, subdomain: str, site_name: str, email: str,
           checkout_payment_status: str = "unpaid", old_invoice_shape: bool = False) -> list[dict]:
    """The events of one signup: checkout completed, then its first invoice paid."""
    customer, subscription = new_id("cus"), new_id("sub")
    return [
        event("checkout.session.completed", checkout_session(
            subdomain=subdomain, site_name=site_name, email=email, customer=customer,
            subscription=subscription, payment_status=checkout_payment_status)),
        event("invoice.paid", invoice(customer=customer, subscription=subscription,
                                      old_shape=old_invoice_shape)),
    ]
