"""Webhook intake: verify, record, acknowledge. Nothing slow happens here."""

from __future__ import annotations

import json
from dataclasses import dataclass

import stripe
from pony.orm import TransactionIntegrityError, db_session

from provisioner import jobs
from provisioner.models import StripeEvent


class RejectedEvent(Exception):
    """The request is not a genuine, well-formed Stripe event (answer 400)."""


@dataclass(frozen=True)
class Intake:
    stripe_id: str
    type: str
    duplicate: bool


def verify(payload: bytes, signature: str | None, secret: str, tolerance: int) -> dict:
    """Check Stripe's signature and the event's shape; return the parsed event."""
    if not signature:
        raise RejectedEvent("missing Stripe-Signature header")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedEvent("body is not UTF-8") from None
    try:
        stripe.WebhookSignature.verify_header(text, signature, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        reason = str(exc).split(".")[0] or "signature verification failed"
        raise RejectedEvent(f"bad signature: {reason}") from None
    except (ValueError, IndexError):
        raise RejectedEvent("malformed Stripe-Signature header") from None
    try:
        event = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RejectedEvent(f"body is not JSON: {exc.msg}") from None
    if not isinstance(event, dict):
        raise RejectedEvent("event must be a JSON object")
    if not isinstance(event.get("id"), str) or not event["id"].startswith("evt_"):
        raise RejectedEvent("event has no evt_ id")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise RejectedEvent("event has no type")
    if not isinstance((event.get("data") or {}).get("object"), dict):
        raise RejectedEvent("event has no data.object")
    return event


def record(event: dict, payload: bytes) -> Intake:
    """Store the event and queue its processing; a repeated id is a no-op."""
    try:
        with db_session:
            if StripeEvent.get(stripe_id=event["id"]) is not None:
                return Intake(event["id"], event["type"], duplicate=True)
            stored = StripeEvent(stripe_id=event["id"], type=event["type"],
                                 payload=payload.decode("utf-8"))
            jobs.enqueue("event", event=stored)
    except TransactionIntegrityError:
        # The same event delivered twice at once: the other request stored it.
        return Intake(event["id"], event["type"], duplicate=True)
    return Intake(event["id"], event["type"], duplicate=False)
