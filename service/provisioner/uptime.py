"""Uptime history: each store's health checks folded into hours and days, and its
30- and 90-day uptime.

The health sweep keeps one ok row per healthy store per hour and one row per failed
check (maintenance._record_healthy), so an hour is:

- up: only ok rows; down: only failed rows; degraded: both;
- without rows (the store was stopped, or nothing swept it): no data, left out of
  every figure, so a store nobody checked is never "100%".

A degraded hour counts as the share of its checks that passed. Failed checks are
exact (one row each); passed ones are not (ok rows are merged), so they are taken as
the checks the sweep makes in an hour less the failed ones, and never fewer than the
ok rows: with a 5-minute sweep, one failure in an hour is 11/12 up, not 1/2.

Days and windows are UTC calendar days ending today (today so far included): the
30-day figure covers today and the 29 days before it. Figures are rounded down to
two decimals, so a single failed check never shows as 100%.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import date, datetime, timedelta

from pony.orm import count, select

from provisioner.models import HealthCheck, Instance, utcnow

WINDOWS = (30, 90)
CHART_DAYS = 90
DEFAULT_INTERVAL_MINUTES = 5

# An hour as the number YYYYMMDDHH -> [ok rows, failed rows]
Hours = dict[int, list[int]]


def checks_per_hour(interval_minutes: int) -> int:
    """How many checks a sweep every `interval_minutes` makes in an hour (at least 1)."""
    return max(1, 60 // max(1, interval_minutes))


def hour_share(ok_rows: int, failed: int, per_hour: int) -> float | None:
    """The share of an hour the store was up, from its rows (None: no data)."""
    if not ok_rows and not failed:
        return None
    if not failed:
        return 1.0
    if not ok_rows:
        return 0.0
    passed = max(ok_rows, per_hour - failed)
    return passed / (passed + failed)


def percent(up: float, hours: int) -> float | None:
    """Up hours over hours with data, as a percentage rounded down to 0.01 (None: no
    data). Rounding down keeps a short outage in 90 days from reading 100%."""
    if not hours:
        return None
    return math.floor(up / hours * 10000 + 1e-9) / 100


def level(uptime: float | None) -> str:
    """A day's colour in the chart."""
    if uptime is None:
        return "none"
    return "up" if uptime >= 100 else "down" if uptime <= 0 else "partial"


def _day_number(day: date) -> int:
    """YYYYMMDD: the hour number without its hour, in date order."""
    return day.year * 10000 + day.month * 100 + day.day


def summarize(hours: Hours, today: date, per_hour: int) -> dict:
    """Figures for each window and one entry per day of the chart, oldest first: plain
    data, from the hour counts of one store."""
    by_day: dict[int, list[float]] = defaultdict(list)  # YYYYMMDD -> its hours' shares
    for hour, (ok_rows, failed) in hours.items():
        share = hour_share(ok_rows, failed, per_hour)
        if share is not None:
            by_day[hour // 100].append(share)
    summary: dict = {}
    for window in WINDOWS:
        first, last = _day_number(today - timedelta(days=window - 1)), _day_number(today)
        counted = [share for day, shares in by_day.items() if first <= day <= last
                   for share in shares]
        summary[f"uptime_{window}"] = percent(sum(counted), len(counted))
        summary[f"hours_{window}"] = len(counted)
    series = []
    for back in range(CHART_DAYS - 1, -1, -1):
        day = today - timedelta(days=back)
        shares = by_day.get(_day_number(day), [])
        uptime = percent(sum(shares), len(shares))
        series.append({"date": day.isoformat(), "uptime": uptime, "hours": len(shares),
                       "level": level(uptime)})
    summary["days"] = series
    return summary


def window_start(today: date) -> datetime:
    """The first moment any figure or the chart looks at."""
    first = today - timedelta(days=max(*WINDOWS, CHART_DAYS) - 1)
    return datetime(first.year, first.month, first.day)


def _hour_counts(query) -> dict[int, Hours]:
    """Rows of a HealthCheck query counted per store, hour and result: one query. The
    hour is one number (YYYYMMDDHH): a quarter of the columns Pony converts per row."""
    counted: dict[int, Hours] = defaultdict(dict)
    rows = select((h.instance.id, h.at.year * 1000000 + h.at.month * 10000 + h.at.day * 100
                   + h.at.hour, h.ok, count()) for h in query)
    for instance_id, hour, ok, n in rows:
        counted[instance_id].setdefault(hour, [0, 0])[0 if ok else 1] += n
    return counted


def detail(instance: Instance, *, interval_minutes: int = DEFAULT_INTERVAL_MINUTES,
           now: datetime | None = None) -> dict:
    """One store's figures and daily series, and whether they are public (needs a
    db_session; one query)."""
    today = (now or utcnow()).date()
    start = window_start(today)
    counted = _hour_counts(HealthCheck.select(
        lambda h: h.instance == instance and h.at >= start))
    return {"instance_id": instance.id, "public": instance.uptime_public,
            **summarize(counted.get(instance.id, {}), today,
                        checks_per_hour(interval_minutes))}


def public_rows(*, interval_minutes: int = DEFAULT_INTERVAL_MINUTES,
                now: datetime | None = None) -> list[dict]:
    """Live stores an admin made public, by subdomain: name, figures and series, nothing
    else (no email, no check's text). Two queries however many stores are shown."""
    today = (now or utcnow()).date()
    start = window_start(today)
    stores = select(i for i in Instance if i.live and i.uptime_public
                    ).order_by(Instance.subdomain)[:]
    if not stores:
        return []
    counted = _hour_counts(HealthCheck.select(
        lambda h: h.instance.live and h.instance.uptime_public and h.at >= start))
    per_hour = checks_per_hour(interval_minutes)
    return [{"subdomain": i.subdomain, "site_name": i.site_name,
             **summarize(counted.get(i.id, {}), today, per_hour)} for i in stores]


def set_public(instance: Instance, show: bool) -> bool:
    """Show or hide a store's uptime on the public status page; whether that changed."""
    changed = instance.uptime_public != show
    instance.uptime_public = show
    return changed
