"""Reading Stripe's objects: ids or expanded objects, old and current API shapes."""

from __future__ import annotations

from datetime import UTC, datetime


def object_id(value: object) -> str | None:
    """Stripe fields hold either an id or an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def invoice_subscription_id(invoice: dict) -> str | None:
    """The subscription of an invoice, in the old or the current API shape."""
    old = object_id(invoice.get("subscription"))
    if old:
        return old
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") or {}
    new = object_id(details.get("subscription"))
    if new:
        return new
    for line in (invoice.get("lines") or {}).get("data") or []:
        line_parent = (line.get("parent") or {}).get("subscription_item_details") or {}
        found = object_id(line.get("subscription")) or object_id(line_parent.get("subscription"))
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
    return timestamp(start), timestamp(end)


def timestamp(value: object) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    return None
