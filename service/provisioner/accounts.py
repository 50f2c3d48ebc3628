"""A customer's own page, reached by a signed, expiring link from their emails: no
password database for customers. The page shows their stores and sends them to
Stripe's Customer Portal to change their card, plan or cancel.

A link is `<customer id>.<expiry, epoch seconds>.<HMAC-SHA256>` under a key the
service makes once and keeps in its database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime, timedelta

import stripe

from provisioner import lifecycle, store_plans
from provisioner.checkout import CheckoutUnavailable, stripe_client
from provisioner.config import Config
from provisioner.models import ACCOUNT_LINK_KEY, Customer, kept_setting, utcnow

_keys: dict[str, bytes] = {}


class InvalidLink(Exception):
    """The link is malformed, forged or expired; the message says which (not more)."""


class PortalUnavailable(Exception):
    """Stripe's billing portal could not be opened; the message is for the customer."""


def _key() -> bytes:
    """The signing key, made once per database by models.open_database."""
    if ACCOUNT_LINK_KEY not in _keys:
        _keys[ACCOUNT_LINK_KEY] = bytes.fromhex(kept_setting(ACCOUNT_LINK_KEY))
    return _keys[ACCOUNT_LINK_KEY]


def _signature(message: str) -> str:
    digest = hmac.new(_key(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def token(customer_id: int, expires: datetime) -> str:
    epoch = int(expires.timestamp()) if expires.tzinfo else \
        int((expires - datetime(1970, 1, 1)).total_seconds())
    message = f"{customer_id}.{epoch}"
    return f"{message}.{_signature(message)}"


def verify(raw: str, now: float | None = None) -> int:
    """The customer id a link is for; InvalidLink when it is not a valid, current one."""
    parts = raw.split(".") if isinstance(raw, str) and len(raw) < 200 else []
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise InvalidLink("this link is not valid")
    if not hmac.compare_digest(_signature(f"{parts[0]}.{parts[1]}").encode(),
                               parts[2].encode("utf-8", "replace")):
        raise InvalidLink("this link is not valid")
    if int(parts[1]) < (now if now is not None else time.time()):
        raise InvalidLink("this link has expired; the newest email we sent you has a fresh one")
    return int(parts[0])


def account_url(config: Config, customer: Customer) -> str:
    expires = utcnow() + timedelta(days=config.account_link_days)
    return f"{config.public_url}/account/{token(customer.id, expires)}/"


def view(config: Config, customer: Customer) -> dict:
    """What the customer may see of their own stores (needs a db_session)."""
    stores = []
    for instance in customer.instances.select(lambda i: i.live).order_by(lambda i: i.id):
        subscription = instance.subscription
        grace = lifecycle.grace_ends(instance, config)
        stores.append({
            "site_name": instance.site_name,
            "url": config.store_url(instance.subdomain),
            "state": _STATE_WORDS.get(instance.status, "being set up"),
            "plan": store_plans.name_of(config, instance),
            "price": store_plans.billed_text(config, instance),
            "renews": _day(subscription.current_period_end) if subscription else "",
            "trial_ends": _day(subscription.trial_end) if subscription and
            subscription.status == "trialing" else "",
            "grace_ends": _day(grace),
            "delete_after": _day(instance.delete_after),
        })
    return {"email": customer.email, "stores": stores,
            "billing": bool(customer.stripe_id)}


_STATE_WORDS = {"running": "online", "stopped": "stopped by our staff",
                "suspended": "suspended (payment needed)", "cancelled": "closed",
                "failed": "having a problem (we are on it)",
                "out_of_step": "being updated", "provisioning": "being updated"}


def _day(moment: datetime | None) -> str:
    return moment.date().isoformat() if moment else ""


def portal_url(config: Config, customer: Customer, return_url: str) -> str:
    """A fresh Stripe Customer Portal session for this customer (they expire quickly,
    so each visit makes one)."""
    if not customer.stripe_id:
        raise PortalUnavailable("billing is not set up for this account yet")
    try:
        session = stripe_client(config).v1.billing_portal.sessions.create(params={
            "customer": customer.stripe_id, "return_url": return_url})
    except CheckoutUnavailable:
        raise PortalUnavailable("billing is not available right now; please try later") \
            from None
    except stripe.StripeError as exc:
        raise PortalUnavailable("Stripe could not open your billing page right now "
                                f"({type(exc).__name__}); please try again later") from None
    return session.url
