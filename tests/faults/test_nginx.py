"""nginx faults: a foreign broken file in its config dir, nginx not running, and a vhost
of ours whose store is gone."""

from __future__ import annotations

import time

import pytest

from provisioner.testing.faults import (
    BASE_DOMAIN,
    RUN_DEADLINE,
    poll,
    start_nginx,
    stop_nginx,
    through_nginx,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def wait_failed(stack, subdomain: str, timeout: float = RUN_DEADLINE) -> dict:
    poll(lambda: stack.failed_for_good(subdomain), timeout, f"{subdomain} to fail")
    return stack.store(subdomain)


def visible_failure(service, store_id: int) -> str:
    """The store as the admin API shows it: failed, with the reason."""
    answer = service.api("GET", f"/api/instances/{store_id}/")
    assert answer.status == 200, answer
    detail = answer.json()
    assert detail["status"] == "failed", detail["status"]
    assert detail["status_message"], "failed without a reason"
    return detail["status_message"]


def test_a_foreign_broken_file_fails_the_store_visibly_and_retry_brings_it_live(stack,
                                                                               measured):
    foreign = stack.nginx.sites / "zz-foreign.conf"
    foreign.write_text("server { this is not nginx; }\n")
    try:
        service = stack.service(JOB_MAX_ATTEMPTS="1")
        service.deliver(stack.signup("foreign-shop"))
        store = wait_failed(stack, "foreign-shop")
        assert "zz-foreign.conf" in visible_failure(service, store["id"])
        poll(lambda: any("foreign-shop" in str(m["Subject"]) for m in stack.mailbox.alerts()),
             30, "an admin alert that the store failed")
    finally:
        foreign.unlink()
    fixed = time.monotonic()
    service.retry(store["id"])
    stack.wait_live("foreign-shop")
    measured("live after the file was removed and retried", time.monotonic() - fixed)
    stack.assert_end_state("foreign-shop")


def test_nginx_not_running_fails_the_store_visibly_and_retry_brings_it_live(stack,
                                                                           measured):
    stop_nginx(stack.nginx)
    try:
        service = stack.service(JOB_MAX_ATTEMPTS="1")
        service.deliver(stack.signup("nginx-down-shop"))
        store = wait_failed(stack, "nginx-down-shop")
        assert "nginx" in visible_failure(service, store["id"]).lower()
    finally:
        start_nginx(stack.nginx)
    fixed = time.monotonic()
    service.retry(store["id"])
    stack.wait_live("nginx-down-shop")
    measured("live after nginx started and retried", time.monotonic() - fixed)
    stack.assert_end_state("nginx-down-shop")


def test_provisioner_nginx_removes_a_vhost_whose_store_is_gone(stack, measured):
    """A vhost of ours (our installation's marker) for a store the DB does not know:
    `provisioner nginx` removes it, and the stores that exist stay live."""
    service = stack.service()
    keep = [name for name in ("foreign-shop", "nginx-down-shop") if stack.live(name)]
    if not keep:  # run on its own: make a store to keep
        service.deliver(stack.signup("kept-shop"))
        stack.wait_live("kept-shop")
        keep = ["kept-shop"]
    model = (stack.nginx.sites / f"{keep[0]}.{BASE_DOMAIN}.conf").read_text()
    assert f"ebuilder-installation: {stack.installation_id}" in model
    ghost = stack.nginx.sites / f"ghost-shop.{BASE_DOMAIN}.conf"
    ghost.write_text(model.replace(f"{keep[0]}.{BASE_DOMAIN}", f"ghost-shop.{BASE_DOMAIN}"))
    stop_nginx(stack.nginx)  # started again below with the ghost loaded
    start_nginx(stack.nginx)
    poll(lambda: through_nginx(stack.nginx, "ghost-shop") == 200, 10, "the ghost vhost to serve")

    started = time.monotonic()
    result = service.cli("nginx")
    measured("provisioner nginx", time.monotonic() - started)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not ghost.exists(), f"the ghost vhost is still there:\n{result.stdout}"
    assert through_nginx(stack.nginx, "ghost-shop") == 404
    for name in keep:
        assert stack.live(name), name
        assert (stack.nginx.sites / f"{name}.{BASE_DOMAIN}.conf").exists()
