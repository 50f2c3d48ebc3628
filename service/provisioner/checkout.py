"""Creating Stripe Checkout Sessions for new stores."""

from __future__ import annotations

import re

import stripe

from provisioner.config import Config
from provisioner.plans import Plan

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class CheckoutUnavailable(Exception):
    """Stripe is not configured or did not answer (503)."""


def validate_email(raw: object) -> str:
    if not isinstance(raw, str) or not _EMAIL.fullmatch(raw.strip()) or len(raw) > 254:
        raise ValueError("a valid email address is required")
    return raw.strip()


def validate_site_name(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("site_name is required")
    name = raw.strip()
    if len(name) > 100:
        raise ValueError("site_name must be at most 100 characters")
    if any(ord(c) < 32 for c in name):
        raise ValueError("site_name must not contain control characters")
    return name


def stripe_client(config: Config) -> stripe.StripeClient:
    if not config.stripe_secret_key:
        raise CheckoutUnavailable("STRIPE_SECRET_KEY is not configured")
    options: dict = {}
    if config.stripe_api_base:
        options["base_addresses"] = {"api": config.stripe_api_base}
    return stripe.StripeClient(config.stripe_secret_key, **options)


def create_checkout_session(config: Config, subdomain: str, site_name: str, email: str,
                            plan: Plan) -> dict:
    """A subscription-mode session for `plan` carrying the store's metadata (with the
    plan's trial, promotion codes allowed); returns id and url."""
    if plan.price_id == "price_unset":
        raise CheckoutUnavailable("STRIPE_PRICE_ID is not configured")
    metadata = {"subdomain": subdomain, "site_name": site_name, "plan": plan.key}
    subscription_data: dict = {"metadata": metadata}
    if plan.trial_days:
        # Card details are still taken: a trial that ends unpaid is past_due, then
        # suspended after the usual grace.
        subscription_data["trial_period_days"] = plan.trial_days
    try:
        session = stripe_client(config).v1.checkout.sessions.create(params={
            "mode": "subscription",
            "line_items": [{"price": plan.price_id, "quantity": 1}],
            "customer_email": email,
            "metadata": metadata,
            "subscription_data": subscription_data,
            "allow_promotion_codes": True,
            "success_url": (
                f"{config.public_url}/signup/success/?session_id={{CHECKOUT_SESSION_ID}}"
            ),
            "cancel_url": f"{config.public_url}/signup/cancelled/",
        })
    except stripe.StripeError as exc:
        raise CheckoutUnavailable(f"Stripe refused the checkout: {exc.user_message or 'error'}") \
            from None
    return {"id": session.id, "url": session.url,
            "expires_at": session.to_dict().get("expires_at")}
