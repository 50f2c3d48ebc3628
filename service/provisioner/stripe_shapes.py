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


_MONTHS_PER = {"day": 12 / 365, "week": 12 / 52, "month": 1, "year": 12}


def subscription_price(sub: dict) -> tuple[str | None, int | None, str | None]:
    """(price id, amount billed a month in minor units, currency) of the first item,
    from its Price (current shape) or Plan (old shape); None where the snapshot lacks it."""
    items = (sub.get("items") or {}).get("data") or []
    if not items:
        return None, None, None
    item = items[0]
    price = item.get("price") if isinstance(item.get("price"), dict) else item.get("plan")
    if not isinstance(price, dict):
        return object_id(item.get("price")), None, None
    recurring = price.get("recurring") or price
    amount = price.get("unit_amount", price.get("amount"))
    interval = recurring.get("interval")
    count = recurring.get("interval_count") or 1
    quantity = item.get("quantity") or 1
    monthly = None
    if isinstance(amount, int) and interval in _MONTHS_PER and isinstance(count, int):
        monthly = round(amount * quantity / (_MONTHS_PER[interval] * count))
    currency = price.get("currency")
    return object_id(price), monthly, currency if isinstance(currency, str) else None


def timestamp(value: object) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    return None
