"""Revenue figures from the truth: each subscription's own price (as Stripe's snapshots
gave it) and status, never a price assumed. SQL aggregates only: a fixed number of
queries however many subscriptions there are.

MRR (minor units a month, per currency) counts what is billed each month by
subscriptions that are active or past due (a past-due one is still owed, as Stripe
counts it); trials are not revenue yet. Prices are list prices: a promotion code's
discount is not taken off.
"""

from __future__ import annotations

from datetime import timedelta

from pony.orm import count, select
from pony.orm import sum as pony_sum

from provisioner import plans
from provisioner.config import Config
from provisioner.models import StripeEvent, Subscription, utcnow

BILLED = ("active", "past_due")


def figures(config: Config, days: int = 30) -> dict:
    since = utcnow() - timedelta(days=days)
    known = {p.price_id: p for p in plans.all_plans(config)}
    fallback = plans.default(config)
    # distinct=False: Pony's aggregates of an attribute are DISTINCT by default.
    rows = select((s.price_id, s.currency, s.status, count(),
                   pony_sum(s.monthly_amount, distinct=False),
                   count(s.monthly_amount, distinct=False)) for s in Subscription
                  if s.status in ("active", "past_due", "trialing", "unpaid", "paused"))
    by_plan: dict[str, dict] = {}
    by_currency: dict[str, int] = {}
    for price_id, currency, status, number, amount, priced in rows:
        # No snapshot with its price yet (only an invoice seen, or an older database):
        # counted on the default plan.
        plan = known.get(price_id) if price_id else fallback
        price_id = price_id or fallback.price_id
        currency = currency or (plan.currency if plan else fallback.currency)
        row = by_plan.setdefault(price_id, {
            "price_id": price_id, "plan": plan.name if plan else None,
            "price_text": plan.price_text if plan else None, "currency": currency,
            "active": 0, "trialing": 0, "past_due": 0, "unpaid_or_paused": 0,
            "mrr_pence": 0})
        key = status if status in ("active", "trialing", "past_due") else "unpaid_or_paused"
        row[key] += number
        if status in BILLED:
            # A snapshot without a price (an old row): its plan's price, if we know it.
            billed = (amount or 0) + (number - priced) * (plan.price_pence if plan else 0)
            row["mrr_pence"] += billed
            by_currency[currency] = by_currency.get(currency, 0) + billed
    for plan in known.values():
        by_plan.setdefault(plan.price_id, {
            "price_id": plan.price_id, "plan": plan.name, "price_text": plan.price_text,
            "currency": plan.currency,
            "active": 0, "trialing": 0, "past_due": 0, "unpaid_or_paused": 0,
            "mrr_pence": 0})
    billed_now = sum(r["active"] + r["past_due"] for r in by_plan.values())
    # Those that paid and ended: a checkout never paid, a trial never billed is no churn.
    cancelled = Subscription.select(lambda s: s.status == "canceled" and s.payment_confirmed
                                    and s.canceled_at is not None
                                    and s.canceled_at >= since).count()
    # Churn over the window: those who ended in it, of those billed at its start (the
    # billed now plus the ended since; new ones of the window slightly dilute it).
    base = billed_now + cancelled
    counted = dict(select((e.type, count()) for e in StripeEvent
                          if e.type in ("invoice.payment_failed", "charge.dispute.created")
                          and e.received_at >= since))
    failed = counted.get("invoice.payment_failed", 0)
    disputes = counted.get("charge.dispute.created", 0)
    currency = fallback.currency
    return {
        "currency": currency,
        # In the default plan's currency; other currencies only in mrr_by_currency.
        "mrr_pence": by_currency.get(currency, 0),
        "mrr_by_currency": by_currency,
        "billed_subscriptions": billed_now,
        "trialing_subscriptions": sum(r["trialing"] for r in by_plan.values()),
        "cancelled_in_window": cancelled,
        "churn_rate": round(cancelled / base, 4) if base else 0.0,
        "failed_payments_in_window": failed,
        "disputes_in_window": disputes,
        "window_days": days,
        "plans": sorted(by_plan.values(), key=lambda r: (-r["mrr_pence"], r["price_id"] or "")),
    }
