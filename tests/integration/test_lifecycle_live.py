"""Suspend, unsuspend, cancel and archive-then-destroy on real Docker and nginx."""

from __future__ import annotations

import subprocess
import tarfile
from datetime import timedelta

from pony.orm import db_session

from provisioner import lifecycle
from provisioner.models import Instance, utcnow
from provisioner.testing import stripe_events
from tests.integration.conftest import https_request, inspect, poll, wait_until_live


def signup(service, name):
    evts = stripe_events.signup(subdomain=name, site_name=name.title(), email=f"{name}@example.com")
    for evt in evts:
        service.post_event(evt)
    wait_until_live(name)
    invoice = evts[1]["data"]["object"]
    return invoice["customer"], invoice["parent"]["subscription_details"]["subscription"]


def subscription_update(customer, sub_id, status, event_type="customer.subscription.updated",
                        **extra):
    sub = stripe_events.resource("subscription")
    sub.update({"id": sub_id, "customer": customer, "status": status, "cancel_at": None,
                "canceled_at": None, "ended_at": None, **extra})
    return stripe_events.event(event_type, sub)


def wait_for_status(name, status, timeout=120):
    def reached():
        with db_session:
            instance = Instance.get(subdomain=name)
            return instance.status == status and instance
    poll(reached, timeout=timeout, what=f"{name} to be {status}")


def container_running(name) -> bool:
    return inspect(f"ebuilder_{name}")["State"]["Running"]


def test_unpaid_store_is_suspended_behind_a_503_page_and_comes_back_when_paid(service):
    customer, sub_id = signup(service, "late-payer")
    container_id = inspect("ebuilder_late-payer")["Id"]

    service.post_event(subscription_update(customer, sub_id, "unpaid"))
    wait_for_status("late-payer", "suspended")
    assert not container_running("late-payer")
    status, body = https_request(service.nginx, "late-payer.stores.test", "/")
    assert status == 503 and b"suspended" in body and b"payment" in body

    service.post_event(stripe_events.event("invoice.paid", stripe_events.invoice(
        customer=customer, subscription=sub_id)))
    wait_for_status("late-payer", "running")
    assert container_running("late-payer")
    assert inspect("ebuilder_late-payer")["Id"] == container_id, "unsuspend recreated it"
    status, body = https_request(service.nginx, "late-payer.stores.test", "/health/")
    assert (status, body.strip()) == (200, b"ok")
    subjects = [m for m in service.smtp.messages if b"late-payer@example.com" in m]
    assert any(b"is suspended" in m for m in subjects)
    assert any(b"back online" in m for m in subjects)


def test_cancelled_store_closes_then_is_archived_and_destroyed(service):
    customer, sub_id = signup(service, "leaving-shop")
    with db_session:
        instance = Instance.get(subdomain="leaving-shop")
        data_dir = service.config.customer_data_root / str(instance.id)
        vhost = service.nginx.sites / "leaving-shop.stores.test.conf"
    assert data_dir.is_dir() and vhost.exists()

    now = int(utcnow().timestamp())
    service.post_event(subscription_update(customer, sub_id, "canceled",
                                           "customer.subscription.deleted",
                                           canceled_at=now, ended_at=now))
    wait_for_status("leaving-shop", "cancelled")
    assert not container_running("leaving-shop")
    status, body = https_request(service.nginx, "leaving-shop.stores.test", "/")
    assert status == 503 and b"closed" in body

    with db_session:
        instance = Instance.get(subdomain="leaving-shop")
        assert instance.delete_after > utcnow() + timedelta(days=29)
        instance.delete_after = utcnow() - timedelta(seconds=1)
        assert lifecycle.schedule_deletions() == [instance.id]
    service.wake()
    wait_for_status("leaving-shop", "destroyed", timeout=180)
    with db_session:
        instance = Instance.get(subdomain="leaving-shop")
        archive = instance.archive_path
        assert instance.live is False
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert f"{instance.id}/db/admin" in names
        assert tar.extractfile(f"{instance.id}/db/admin").read().startswith(
            b"leaving-shop@example.com")
    assert subprocess.run(["docker", "inspect", "ebuilder_leaving-shop"],
                          capture_output=True).returncode != 0
    assert not vhost.exists()
    assert not data_dir.exists()
    status, _ = https_request(service.nginx, "leaving-shop.stores.test", "/")
    assert status == 404, "the default server answers: the store is gone"


def test_failed_archive_stops_the_destroy(service):
    customer, sub_id = signup(service, "keep-data")
    now = int(utcnow().timestamp())
    service.post_event(subscription_update(customer, sub_id, "canceled",
                                           "customer.subscription.deleted",
                                           canceled_at=now, ended_at=now))
    wait_for_status("keep-data", "cancelled")
    blocker = service.config.backup_root
    with db_session:
        instance = Instance.get(subdomain="keep-data")
        data_dir = service.config.customer_data_root / str(instance.id)
        instance.delete_after = utcnow() - timedelta(seconds=1)
        # Make the backup root unusable: a file where the directory should be.
        blocker.parent.mkdir(parents=True, exist_ok=True)
        if blocker.is_dir():
            blocker.rename(blocker.with_suffix(".moved"))
        blocker.write_text("not a directory")
        lifecycle.schedule_deletions()
    try:
        service.wake()

        def gave_up_or_retrying():
            with db_session:
                job = Instance.get(subdomain="keep-data").jobs.select(
                    lambda j: j.kind == "destroy").first()
                return job is not None and job.last_error and job
        poll(gave_up_or_retrying, timeout=120, what="the destroy job to fail")
        with db_session:
            instance = Instance.get(subdomain="keep-data")
            assert instance.live and instance.status != "destroyed"
        assert data_dir.is_dir()
        assert subprocess.run(["docker", "inspect", "ebuilder_keep-data"],
                              capture_output=True).returncode == 0
    finally:
        blocker.unlink()
