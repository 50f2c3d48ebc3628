"""Uptime history: hours and days from HealthCheck rows, the 30/90-day figures, the
admin API and form, and the public status page (real database, real app over WSGI)."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta

import pytest
from pony.orm import db_session, flush

from provisioner import uptime
from provisioner.models import AuditEntry, HealthCheck, Instance, db, utcnow
from provisioner.web import create_app
from provisioner.web.common import _PAGES
from tests.wsgi import basic, call

PASSWORD = "admin-pass-123"
AUTH = basic("admin", PASSWORD)
FORM = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
NOW = datetime(2024, 6, 30, 15, 20)
BASE = datetime(2024, 6, 30, 15)  # the start of NOW's hour: rows fall in whole hours
HOUR = timedelta(hours=1)


@pytest.fixture
def admin_config(config):
    return dataclasses.replace(config, admin_password=PASSWORD, admin_token="t" * 24)


@pytest.fixture
def app(admin_config):
    return create_app(admin_config)


def store(name: str, site_name: str | None = None, **fields) -> int:
    with db_session:
        instance = Instance(subdomain=name, site_name=site_name or name.title(),
                            admin_email=f"{name}@example.com",
                            port=19100 + Instance.select().count(), **fields)
        flush()
        return instance.id


def checks(instance_id: int, start: datetime, hours: int, ok: bool = True,
           per_hour: int = 1) -> None:
    """Rows as the sweep leaves them: one ok row an hour, or `per_hour` failed ones."""
    with db_session:
        for h in range(hours):
            for n in range(per_hour):
                HealthCheck(instance=Instance[instance_id], ok=ok, at=start + h * HOUR
                            + timedelta(minutes=5 * n), detail=None if ok else "HTTP 502")


def this_hour() -> datetime:
    return utcnow().replace(minute=0, second=0, microsecond=0)


def detail(instance_id: int, now: datetime = NOW, **kwargs) -> dict:
    with db_session:
        return uptime.detail(Instance[instance_id], now=now, **kwargs)


def test_an_hour_is_up_down_or_degraded_by_the_share_of_checks_that_passed():
    assert uptime.hour_share(1, 0, 12) == 1.0
    assert uptime.hour_share(0, 3, 12) == 0.0
    assert uptime.hour_share(0, 0, 12) is None
    # One ok row stands for the hour's other checks: 2 failed of 12 is 10/12 up.
    assert uptime.hour_share(1, 2, 12) == pytest.approx(10 / 12)
    # More failures than an hour's checks (a sweep run by hand): never below the ok rows.
    assert uptime.hour_share(2, 14, 12) == pytest.approx(2 / 16)
    assert uptime.checks_per_hour(5) == 12 and uptime.checks_per_hour(90) == 1


def test_all_up_is_100_and_counts_its_hours():
    shop = store("alpha-shop")
    checks(shop, BASE - 47 * HOUR, 48)
    figures = detail(shop)
    assert (figures["uptime_30"], figures["hours_30"]) == (100.0, 48)
    assert (figures["uptime_90"], figures["hours_90"]) == (100.0, 48)
    assert figures["days"][-1] == {"date": "2024-06-30", "uptime": 100.0, "hours": 16,
                                   "level": "up"}


def test_a_two_hour_outage_among_48_hours():
    shop = store("alpha-shop")
    start = BASE - 47 * HOUR
    checks(shop, start, 20)
    checks(shop, start + 20 * HOUR, 2, ok=False, per_hour=12)
    checks(shop, start + 22 * HOUR, 26)
    figures = detail(shop)
    assert (figures["uptime_30"], figures["hours_30"]) == (95.83, 48)  # 46/48, rounded down
    partial = [d for d in figures["days"] if d["level"] == "partial"]
    assert [(d["date"], d["uptime"]) for d in partial] == [("2024-06-29", 91.66)]  # 22/24


def test_a_degraded_hour_counts_the_checks_that_passed():
    shop = store("alpha-shop")
    hour = datetime(2024, 6, 30, 9)
    checks(shop, hour, 1)
    checks(shop, hour + timedelta(minutes=20), 1, ok=False, per_hour=2)
    assert detail(shop)["uptime_30"] == 83.33  # 10 of 12 checks passed
    # Swept once an hour, the same rows are 1 passed of 3.
    assert detail(shop, interval_minutes=60)["uptime_30"] == 33.33


def test_one_failed_check_in_90_days_is_not_100():
    shop = store("alpha-shop")
    checks(shop, datetime(2024, 4, 2), 90 * 24 - 10)
    checks(shop, datetime(2024, 5, 1, 3, 7), 1, ok=False)
    figures = detail(shop)
    assert figures["uptime_90"] == 99.99 and figures["uptime_30"] == 100.0


def test_no_data_is_no_figure_not_100():
    shop = store("alpha-shop")
    other = store("beta-shop")
    checks(other, BASE - 5 * HOUR, 5)
    figures = detail(shop)
    assert figures["uptime_30"] is None and figures["uptime_90"] is None
    assert figures["hours_90"] == 0
    assert {d["level"] for d in figures["days"]} == {"none"}
    html = _PAGES.get_template("pages/admin/_uptime.html").render(
        uptime=figures, csrf="tok", i={"id": shop, "site_name": "Alpha"})
    assert html.count("<b class=\"uptime-") == 2 and "100.00%" not in html
    assert re.findall(r"<b class=\"uptime-\d+\">([^<]*)<", html) == ["no data", "no data"]


def test_the_windows_are_utc_days_ending_today():
    shop = store("alpha-shop")
    checks(shop, datetime(2024, 4, 1, 23, 59, 59), 1, ok=False)  # 91st day back: out
    checks(shop, datetime(2024, 4, 2), 1)  # first of the 90 days
    checks(shop, datetime(2024, 5, 31, 23, 59), 1, ok=False)  # day 31 back: 90 only
    checks(shop, datetime(2024, 6, 1), 1)  # first of the 30 days
    figures = detail(shop)
    assert (figures["uptime_90"], figures["hours_90"]) == (66.66, 3)
    assert (figures["uptime_30"], figures["hours_30"]) == (100.0, 1)
    days = figures["days"]
    assert len(days) == 90 and (days[0]["date"], days[-1]["date"]) == ("2024-04-02",
                                                                       "2024-06-30")
    assert days[0]["level"] == "up" and days[59]["level"] == "down"


def test_public_rows_take_two_queries_however_many_stores():
    for n in range(6):
        shop = store(f"shop-{n}", uptime_public=n != 0)
        checks(shop, BASE - 30 * HOUR, 30)
    with db_session:
        db.merge_local_stats()
        rows = uptime.public_rows(now=NOW)
        queries = sum(s.db_count for sql, s in db.local_stats.items() if sql)
    assert [r["subdomain"] for r in rows] == [f"shop-{n}" for n in range(1, 6)]
    assert all(r["uptime_30"] == 100.0 and r["hours_30"] == 30 for r in rows)
    assert queries == 2


def test_the_status_page_shows_only_stores_made_public(app):
    shown = store("alpha-shop", site_name="<b>Alpha</b> & Co", uptime_public=True)
    hidden = store("beta-shop")
    gone = store("gamma-shop", uptime_public=True, live=False)
    now = this_hour()
    for shop in (shown, hidden, gone):
        checks(shop, now - 3 * HOUR, 3)
    checks(shown, now - 4 * HOUR, 1, ok=False, per_hour=12)
    status, html, headers = call(app, "GET", "/status/", raw=True)
    html = html.decode()
    assert status == 200 and "Stores running" in html
    assert 'id="uptime-alpha-shop"' in html and "75.00%" in html  # 3 of 4 hours
    assert "&lt;b&gt;Alpha&lt;/b&gt; &amp; Co" in html and "<b>Alpha</b>" not in html
    assert "beta-shop" not in html and "gamma-shop" not in html
    assert "@example.com" not in html and "HTTP 502" not in html
    assert "<script" not in html and "style=" not in html
    assert "script-src 'nonce-" in headers["Content-Security-Policy"]


def test_the_status_page_without_public_stores_has_no_uptime_section(app):
    checks(store("alpha-shop"), this_hour(), 1)
    status, html, _ = call(app, "GET", "/status/", raw=True)
    assert status == 200 and b"Stores running" in html and b"uptime-heading" not in html


def test_the_api_gives_figures_and_series(app):
    shop = store("alpha-shop")
    checks(shop, this_hour() - 9 * HOUR, 10)
    assert call(app, "GET", f"/api/instances/{shop}/uptime/")[0] == 401
    status, body = call(app, "GET", f"/api/instances/{shop}/uptime/", headers=AUTH)
    assert status == 200 and body["subdomain"] == "alpha-shop" and body["public"] is False
    assert (body["uptime_30"], body["hours_90"], len(body["days"])) == (100.0, 10, 90)
    assert call(app, "GET", "/api/instances/999/uptime/", headers=AUTH)[0] == 404


def csrf_token(app, shop: int) -> str:
    status, html, _ = call(app, "GET", f"/admin/instances/{shop}/", headers=AUTH, raw=True)
    assert status == 200
    return re.search(rb'name="csrf" value="([0-9a-f]+)"', html).group(1).decode()


def test_the_store_page_form_needs_csrf_and_is_audited(app):
    shop = store("alpha-shop")
    path = f"/admin/instances/{shop}/uptime-public/"
    status, _, _ = call(app, "POST", path, b"show=1", headers=FORM, raw=True)
    assert status == 403
    with db_session:
        assert Instance[shop].uptime_public is False and not AuditEntry.select().exists()
    token = csrf_token(app, shop)
    status, _, headers = call(app, "POST", path, f"csrf={token}&show=1".encode(),
                              headers=FORM, raw=True)
    assert status == 303 and headers["Location"].endswith(
        f"/admin/instances/{shop}/?flash=uptime%20shown%20on%20the%20status%20page")
    status, _, _ = call(app, "POST", path, f"csrf={token}&show=1".encode(), headers=FORM,
                        raw=True)
    assert status == 303
    with db_session:
        assert Instance[shop].uptime_public is True
        entries = [(a.actor, a.action, a.target, a.detail) for a in AuditEntry.select()
                   .order_by(AuditEntry.id)]
    assert entries == [
        ("admin", "uptime-public", f"instance:{shop}",
         "alpha-shop: uptime shown on the public status page"),
        ("admin", "uptime-public", f"instance:{shop}",
         "alpha-shop: uptime shown on the public status page (already so)")]
    assert call(app, "POST", path, f"csrf={token}&show=0".encode(), headers=FORM,
                raw=True)[0] == 303
    with db_session:
        assert Instance[shop].uptime_public is False
    assert call(app, "POST", path, f"csrf={token}&show=yes".encode(), headers=FORM,
                raw=True)[0] == 400
    assert call(app, "POST", "/admin/instances/999/uptime-public/",
                f"csrf={token}&show=1".encode(), headers=FORM, raw=True)[0] == 404


def test_the_partial_escapes_the_store_name_and_carries_the_form():
    shop = store("alpha-shop", uptime_public=True)
    checks(shop, BASE - 2 * HOUR, 2)
    html = _PAGES.get_template("pages/admin/_uptime.html").render(
        uptime=detail(shop), csrf="tok123",
        i={"id": shop, "site_name": '"><img src=x onerror=alert(1)>'})
    assert "<img" not in html and "&#34;&gt;&lt;img src=x" in html
    assert f'action="/admin/instances/{shop}/uptime-public/"' in html
    assert 'name="csrf" value="tok123"' in html and 'name="show" value="0"' in html
    assert html.count("<rect ") == 90
    assert "<title>2024-06-30: 100.00% up (2 h checked)</title>" in html


def test_the_store_page_shows_the_uptime_and_its_form(app):
    shop = store("alpha-shop", site_name="<i>Alpha</i>")
    checks(shop, this_hour() - 3 * HOUR, 4)
    status, html, _ = call(app, "GET", f"/admin/instances/{shop}/", headers=AUTH, raw=True)
    html = html.decode()
    assert status == 200 and 'id="uptime-heading"' in html
    assert re.findall(r"<b class=\"uptime-\d+\">([^<]*)<", html) == ["100.00%", "100.00%"]
    assert "Uptime of &lt;i&gt;Alpha&lt;/i&gt;" in html and "<i>Alpha</i>" not in html
    assert f'action="/admin/instances/{shop}/uptime-public/"' in html
