"""900 stores: the admin lists, searches, filters, pages, the dashboard and the stats answer
right, with a number of queries (and of rows loaded as objects) that does not grow with
the stores. Real SQLite, real app; the timings are the benchmark's job, not these tests'."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from datetime import timedelta
from urllib.parse import quote_plus

import pytest
from pony.orm import db_session, flush

from provisioner import admin, models
from provisioner.models import AnsibleRun, Customer, Instance, Job, Subscription, utcnow
from provisioner.web import create_app
from tests.wsgi import basic, call

PASSWORD = "admin-pass-123"
AUTH = basic("admin", PASSWORD)
N = 900
# 54 of every 90 stores run; 9 each are failed and need attention.
STATES = ["running"] * 6 + ["pending", "suspended", "failed", "needs_attention"]
TRADES = ["Bakery", "Florist", "Bookshop", "Cobbler", "Grocer", "Tailor"]


def store_row(n: int, now) -> dict:
    """What store n is: everything a test expects is computed from this."""
    return {"subdomain": f"shop-{n:03d}", "site_name": f"{TRADES[n % 6]} Corner {n}",
            "admin_email": f"Owner{n}@{'example.com' if n % 2 else 'mail.test'}",
            "status": STATES[n % 10], "port": 20000 + n,
            # signups spread over 45 days, an hour off midnight-sensitive edges
            "created_at": now - timedelta(days=n % 45, hours=1)}


@pytest.fixture(scope="module")
def fleet(config):
    """N stores inserted once for the module (every test here only reads), each even one
    with a customer and a subscription, some of those cancelled."""
    models.reset()
    now = utcnow()
    made = []
    with db_session:
        for n in range(N):
            row = store_row(n, now)
            customer = subscription = None
            if n % 2 == 0:
                customer = Customer(stripe_id=f"cus_{n}", email=row["admin_email"])
                canceled = (now - timedelta(days=n // 50, hours=1) if n % 50 == 0 else
                            now - timedelta(days=40) if n % 50 == 10 else None)
                subscription = Subscription(stripe_id=f"sub_{n}", customer=customer,
                                            status="canceled" if canceled else "active",
                                            canceled_at=canceled)
            instance = Instance(**row, desired_state="running", customer=customer,
                                subscription=subscription,
                                status_message=f"why {n}" if row["status"] == "failed" else None)
            if n % 100 == 0:
                Job(kind="converge", instance=instance)
            made.append((instance, row))
        # a batch that built every store, and a small one with a job about no store
        batch = AnsibleRun(ident="batch", playbook="provision.yml", artifact_dir="/nowhere")
        small = AnsibleRun(ident="small", playbook="stop.yml", artifact_dir="/nowhere")
        for instance, _ in made:
            Job(kind="converge", instance=instance, ansible_run=batch, state="done")
        for instance, _ in made[1:3]:
            Job(kind="action", detail="stop", instance=instance, ansible_run=small, state="done")
        Job(kind="event", ansible_run=small, state="done")
        flush()
        rows = {instance.id: row for instance, row in made}
    yield rows
    models.reset()


@pytest.fixture
def clean_db():
    """Overrides conftest's: the module's stores stay between its tests."""
    yield


@pytest.fixture(scope="module")
def app(config):
    return create_app(dataclasses.replace(config, admin_password=PASSWORD))


def queries() -> int:
    """SQL statements this thread has sent so far (Pony's own per-thread statistics)."""
    return models.db.local_stats[None].db_count


def get(app, path, query=""):
    before = queries()
    status, body = call(app, "GET", path, headers=AUTH, query=query)
    assert status == 200, (path, query, body)
    return body, queries() - before


def page_html(app, path, query=""):
    status, html, _ = call(app, "GET", path, headers=AUTH, query=query, raw=True)
    assert status == 200, (path, query)
    return html.decode()


def newest_first(fleet, keep=lambda row: True) -> list[int]:
    return sorted((i for i, row in fleet.items() if keep(row)), reverse=True)


# -- the JSON list ---------------------------------------------------------------------------

def test_pages_hold_every_store_once_newest_first(app, fleet):
    seen, page, next_pages = [], 1, []
    while page is not None:
        body, _ = get(app, "/api/instances/", f"per_page=200&page={page}")
        assert (body["total"], body["per_page"], body["pages"]) == (N, 200, 5)
        assert len(body["items"]) == (100 if page == 5 else 200)
        seen += [item["id"] for item in body["items"]]
        next_pages.append(body["next"])
        page = body["next"]
    assert next_pages == [2, 3, 4, 5, None]
    assert seen == newest_first(fleet)
    beyond, _ = get(app, "/api/instances/", "per_page=200&page=6")
    assert (beyond["total"], beyond["items"], beyond["next"]) == (N, [], None)


def test_page_boundaries_of_the_default_page_size(app, fleet):
    ids = newest_first(fleet)
    first, _ = get(app, "/api/instances/")
    assert (first["page"], first["per_page"], first["pages"], first["next"]) == (1, 50, 18, 2)
    assert [i["id"] for i in first["items"]] == ids[:50]
    second, _ = get(app, "/api/instances/", "page=2")
    assert [i["id"] for i in second["items"]] == ids[50:100]
    last, _ = get(app, "/api/instances/", "page=18")
    assert [i["id"] for i in last["items"]] == ids[850:] and last["next"] is None


@pytest.mark.parametrize("status", ["failed", "needs_attention", "running", "stopped"])
def test_filter_by_state_gives_exactly_those_stores(app, fleet, status):
    expected = newest_first(fleet, lambda row: row["status"] == status)
    body, _ = get(app, "/api/instances/", f"status={status}&per_page=200")
    assert body["total"] == len(expected) == {"failed": 90, "needs_attention": 90,
                                               "running": 540, "stopped": 0}[status]
    assert [i["id"] for i in body["items"]] == expected[:200]
    assert {i["status"] for i in body["items"]} <= {status}


@pytest.mark.parametrize("q, field", [
    ("shop-12", "subdomain"), ("SHOP-12", "subdomain"), ("owner7", "admin_email"),
    ("@MAIL.test", "admin_email"), ("florist corner 1", "site_name"), ("Corner 89", "site_name")])
def test_search_looks_in_subdomain_email_and_site_name(app, fleet, q, field):
    expected = newest_first(fleet, lambda row: q.lower() in row[field].lower())
    body, _ = get(app, "/api/instances/", f"q={quote_plus(q)}&per_page=200")
    assert 0 < body["total"] == len(expected)
    assert [i["id"] for i in body["items"]] == expected[:200]


def test_search_and_filter_together_page_by_page(app, fleet):
    def keep(row):
        return row["status"] == "running" and "mail.test" in row["admin_email"].lower()

    expected = newest_first(fleet, keep)
    got = []
    for page in (1, 2, 3, 4, 5, 6, 7):
        body, _ = get(app, "/api/instances/", f"status=running&q=mail.test&per_page=50&page={page}")
        assert body["total"] == len(expected) == 270
        got += [i["id"] for i in body["items"]]
    assert got == expected


@pytest.mark.parametrize("q", ["%", "_", "!", "shop%", "'; --"])
def test_search_text_is_matched_literally(app, fleet, q):
    body, _ = get(app, "/api/instances/", "q=" + quote_plus(q))
    assert body["total"] == 0 and body["items"] == []


def test_list_items_are_the_same_summary_as_one_store(app, fleet, config):
    body, _ = get(app, "/api/instances/", "q=shop-00")  # shop-000 .. shop-009: with and without
    assert body["total"] == 10
    with db_session:
        for item in body["items"]:
            assert item == admin.instance_summary(config, Instance[item["id"]])
    with_subscription = [i for i in body["items"] if i["subscription"]]
    assert with_subscription and [i for i in body["items"] if not i["subscription"]]
    assert all(i["subscription"]["stripe_id"] == f"sub_{int(i['subdomain'][5:])}"
               for i in with_subscription)
    failed = next(i for i in body["items"] if i["status"] == "failed")
    assert failed["status_message"] == f"why {int(failed['subdomain'][5:])}"


def test_a_page_costs_the_same_few_queries_whatever_its_size(app, fleet):
    costs = {query: get(app, "/api/instances/", query)[1]
             for query in ("per_page=1", "per_page=50", "per_page=200", "per_page=200&page=3",
                           "status=failed&per_page=200", "q=corner&per_page=200")}
    # a count, the page's columns, the page's subscriptions: not one query per store
    assert max(costs.values()) == 3, costs


def test_listing_loads_no_store_as_an_object(config, fleet):
    with db_session:
        listing = admin.list_instances(config, per_page=200)
        cached = Counter(type(o).__name__ for o in models.db._get_cache().objects)
    assert len(listing["items"]) == 200
    assert cached["Instance"] == 0 and cached["Subscription"] == 0, cached


def test_the_indexes_the_lists_use_exist(config, fleet):
    with db_session:
        connection = models.db.get_connection()
        names = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
        plan = " ".join(str(row) for row in connection.execute(
            'EXPLAIN QUERY PLAN SELECT "id" FROM "Instance" WHERE "status" = ? '
            'ORDER BY "id" DESC LIMIT 50', ("failed",)))
    assert {"idx_instance__status_id", "idx_instance__created_at", "idx_job__state",
            "idx_subscription__status", "idx_subscription__canceled_at",
            "idx_stripeevent__failed_at"} <= names
    assert "idx_instance__status_id" in plan and "TEMP B-TREE" not in plan, plan


# -- the admin pages -------------------------------------------------------------------------

def store_links(html: str) -> list[str]:
    return re.findall(r'href="/admin/instances/(\d+)/"', html)


def test_store_page_lists_one_page_with_links_that_keep_the_filters(app, fleet):
    html = page_html(app, "/admin/instances/")
    assert store_links(html) == [str(i) for i in newest_first(fleet)[:50]]
    assert "page 1 of 18" in html and "900 in all" in html and 'href="?page=2"' in html
    html = page_html(app, "/admin/instances/", "page=18")
    assert store_links(html) == [str(i) for i in newest_first(fleet)[850:]]
    assert 'href="?page=17"' in html and 'id="next-page"' not in html
    expected = newest_first(fleet, lambda row: row["status"] == "failed"
                            and "corner" in row["site_name"].lower())
    html = page_html(app, "/admin/instances/", "status=failed&q=Corner&page=2")
    assert store_links(html) == [str(i) for i in expected[50:100]]
    assert "page 2 of 2" in html and 'href="?status=failed&amp;q=Corner&amp;page=1"' in html


@pytest.mark.parametrize("page", ["0", "x", "99999999", "-1"])
def test_store_page_forgives_a_bad_page_number(app, fleet, page):
    html = page_html(app, "/admin/instances/", f"page={page}")
    assert "page 1 of 18" in html and len(store_links(html)) == 50


def test_dashboard_shows_counts_and_a_few_stores_in_a_fixed_number_of_queries(app, fleet):
    before = queries()
    html = page_html(app, "/admin/")
    cost = queries() - before
    links = store_links(html)
    # 20 stores needing a look, 10 recent signups (and the queue's job links), never 900
    assert 0 < len(set(links)) <= 20 + 10 + 9
    assert "The newest 20 of 180" in html and "All 900 stores" in html
    assert re.search(r"needs_attention</a><b>90</b>", html)
    assert re.search(r"running</a><b>540</b>", html)
    # stats: +2 for revenue (by price and status; failed payments and disputes)
    # ... and three for the open alerts (the newest, their count, undelivered messages),
    # one for the stores per Docker host.
    assert cost <= 22, cost


def test_dashboard_loads_no_store_as_an_object(config, fleet):
    with db_session:
        board = admin.dashboard(config)
        cached = Counter(type(o).__name__ for o in models.db._get_cache().objects)
    # only the queued jobs' stores (by reference, never loaded): not the 900
    assert cached["Instance"] <= len(board["queue"]) and cached["Subscription"] == 0, cached
    assert [i["status"] for i in board["failing"]] == ["needs_attention", "failed"] * 10
    assert board["failing_total"] == 180 and len(board["recent"]) == 10
    assert board["queue_total"] == 9 and len(board["queue"]) == 9


def test_customers_page_and_api_are_paged_with_their_stores(app, fleet):
    body, cost = get(app, "/api/customers/", "per_page=200&page=3")
    assert (body["total"], body["pages"], body["next"], len(body["items"])) == (450, 3, None, 50)
    assert cost <= 4, cost  # a count, the customers, their subscriptions, their stores
    for customer in body["items"]:
        n = int(customer["stripe_id"][4:])
        assert [i["subdomain"] for i in customer["instances"]] == [f"shop-{n:03d}"]
        assert [s["stripe_id"] for s in customer["subscriptions"]] == [f"sub_{n}"]
    html = page_html(app, "/admin/customers/", "page=2")
    assert "page 2 of 9" in html and len(store_links(html)) == 50


# -- stats -----------------------------------------------------------------------------------

def test_stats_are_sql_counts_and_right(app, fleet, config):
    body, cost = get(app, "/api/stats/")
    assert cost <= 11, cost  # revenue: by price and status, ended in window, event counts
    assert body["instances_total"] == N
    assert body["instances_by_status"] == dict(Counter(row["status"] for row in fleet.values()))
    since = utcnow() - timedelta(days=30)
    assert body["signups_per_day"] == dict(sorted(Counter(
        row["created_at"].date().isoformat() for row in fleet.values()
        if row["created_at"] >= since).items()))
    assert sum(body["signups_per_day"].values()) == 600  # days 0..29 of every 45
    assert sum(body["cancellations_per_day"].values()) == 18  # not the 18 from 40 days ago
    assert body["paying_subscriptions"] == 450 - 36
    assert body["jobs_by_state"] == {"queued": 9, "done": N + 3}
    with db_session:
        admin.stats(config)
        cached = Counter(type(o).__name__ for o in models.db._get_cache().objects)
    assert not cached, cached


def test_runs_page_names_each_runs_stores_in_two_queries(app, fleet):
    before = queries()
    html = page_html(app, "/admin/runs/")
    assert queries() - before <= 2
    assert "shop-001, shop-002</td>" in html and html.count("shop-") == N + 2
    with db_session:
        small, batch = admin.list_runs()
    assert (small["playbook"], small["stores"]) == ("stop.yml", ["shop-001", "shop-002"])
    assert batch["stores"] == sorted(row["subdomain"] for row in fleet.values())
