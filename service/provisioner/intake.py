"""Webhook intake: verify, record, acknowledge. Nothing slow happens here.

Every POST to the webhook is written down as a `WebhookDelivery` (accepted, duplicate,
rejected with the reason), so operators see what arrived; the caller decides which
rejections are worth a row (an attacker's flood is only counted).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import stripe
from pony.orm import TransactionIntegrityError, db_session

from provisioner import jobs
from provisioner.models import StripeEvent, WebhookDelivery

# Stripe's own forms; anything else is not Stripe's (and could not be stored or shown safely).
EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,250}")
EVENT_TYPE = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")
MAX_TYPE_LENGTH = 100
# A delivery row keeps this much of a rejection's reason.
MAX_REASON_LENGTH = 300


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
    if not signature.isascii():
        # Headers arrive as Latin-1 text; Stripe's is ASCII, and hmac refuses anything else.
        raise RejectedEvent("malformed Stripe-Signature header: not ASCII")
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
    return _event_shape(_parse(text))


def _parse(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RejectedEvent(f"body is not JSON: {exc.msg}") from None
    except ValueError:  # an integer longer than Python's digit limit
        raise RejectedEvent("body is not JSON Stripe sends: a number is too long") from None
    except RecursionError:
        raise RejectedEvent("body is not JSON Stripe sends: nested too deeply") from None


def _event_shape(event) -> dict:
    if not isinstance(event, dict):
        raise RejectedEvent("event must be a JSON object")
    if not isinstance(event.get("id"), str) or not EVENT_ID.fullmatch(event["id"]):
        raise RejectedEvent("event has no evt_ id")
    event_type = event.get("type")
    if not isinstance(event_type, str) or len(event_type) > MAX_TYPE_LENGTH \
            or not EVENT_TYPE.fullmatch(event_type):
        raise RejectedEvent("event has no type (a name like invoice.paid)")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise RejectedEvent("event has no data.object")
    created = event.get("created")
    if created is not None and (isinstance(created, bool) or not isinstance(created, int)):
        raise RejectedEvent("event's created must be a Unix time")
    return event


def record(event: dict, payload: bytes, address: str | None = None) -> Intake:
    """Store the event, queue its processing and write the delivery down; a repeated id
    counts as a duplicate and queues nothing."""
    try:
        return _record_once(event, payload, address)
    except TransactionIntegrityError:
        # The same event delivered twice at once: the other request stored it.
        return _record_once(event, payload, address)


def _record_once(event: dict, payload: bytes, address: str | None) -> Intake:
    # One writer at a time from the start: the duplicate count is read and raised in the
    # same transaction, and a busy database is found before any work is done.
    with db_session(immediate=True):
        stored = StripeEvent.get(stripe_id=event["id"])
        duplicate = stored is not None
        if duplicate:
            stored.duplicates += 1
        else:
            stored = StripeEvent(stripe_id=event["id"], type=event["type"],
                                 payload=payload.decode("utf-8"))
            jobs.enqueue("event", event=stored)
        WebhookDelivery(outcome="duplicate" if duplicate else "accepted",
                        stripe_id=event["id"], type=event["type"], address=address)
    return Intake(event["id"], event["type"], duplicate=duplicate)


def record_rejection(reason: str, address: str | None) -> None:
    """Write a rejected delivery down (the caller has decided it is worth a row)."""
    with db_session:
        WebhookDelivery(outcome="rejected", reason=reason[:MAX_REASON_LENGTH],
                        address=address)
