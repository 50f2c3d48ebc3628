"""The service dies or is stopped in the middle of a provisioning run, then starts again."""

from __future__ import annotations

import signal
import time

import pytest

from provisioner.testing.faults import (
    BASE_DOMAIN,
    RUN_DEADLINE,
    hanging_nginx,
    poll,
    through_nginx,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_kill_9_during_a_run_then_restart_finishes_the_store(stack, measured):
    """Only the service's own process dies: its ansible-playbook is orphaned, still
    running. The next start ends it, marks its run abandoned and provisions again."""
    service = stack.service()
    service.deliver(stack.signup("crash-shop"))
    run = stack.wait_run()
    service.signal(signal.SIGKILL)
    service.wait_exit(10)
    assert stack.runs("running"), "the killed run should still be marked running"

    restarted = time.monotonic()
    stack.service()
    stack.wait_live("crash-shop")
    measured("recovery after restart", time.monotonic() - restarted)
    stack.assert_end_state("crash-shop")
    assert {r["id"]: r["status"] for r in stack.runs()}[run["id"]] == "abandoned"
    poll(lambda: not stack.ansible_playbooks(), 10, "no ansible-playbook left")


def test_whole_service_killed_between_vhost_and_reload(stack, measured):
    """systemd or the OOM killer ends the service with every process it started, after
    the new vhost is on disk and before nginx reloaded it: a retry that found the vhost
    "unchanged" used to skip the reload (404 through nginx, no email, forever)."""
    flag = stack.root / "hold-reload"
    flag.touch()
    vhost = stack.nginx.sites / f"halfway-shop.{BASE_DOMAIN}.conf"
    held_nginx = hanging_nginx(stack.root / "nginx-held-reload", flag, match="-s reload",
                               when_exists=vhost)
    service = stack.service(NGINX_BIN=str(held_nginx))
    service.deliver(stack.signup("halfway-shop"))
    poll(lambda: flag.with_name(flag.name + ".waiting").exists(), RUN_DEADLINE,
         "the playbook to reach nginx's reload")
    assert vhost.exists()
    stack.kill_unit(service)
    service.wait_exit(10)
    poll(lambda: not stack.processes(), 10, "the killed run's processes to go")
    flag.unlink()
    assert through_nginx(stack.nginx, "halfway-shop") == 404, "nginx has the vhost already"

    restarted = time.monotonic()
    stack.service()
    stack.wait_live("halfway-shop")
    measured("recovery after restart", time.monotonic() - restarted)
    stack.assert_end_state("halfway-shop")


def test_sigterm_mid_run_stops_within_the_grace_and_restart_finishes(stack, measured):
    """SIGTERM (systemd's stop) while a run is on: it finishes or is cancelled within
    STOP_GRACE_SECONDS, the process exits, no run is left `running` and no
    ansible-playbook behind; the next start provisions the store."""
    grace = 5
    service = stack.service(STOP_GRACE_SECONDS=str(grace))
    service.deliver(stack.signup("term-shop"))
    stack.wait_run()

    service.signal(signal.SIGTERM)
    took = service.wait_exit(grace + 20)
    measured("exit after SIGTERM", took)
    assert not stack.runs("running"), stack.runs("running")
    assert not stack.ansible_playbooks(), "an ansible-playbook outlived the service"

    restarted = time.monotonic()
    stack.service()
    stack.wait_live("term-shop")
    measured("recovery after restart", time.monotonic() - restarted)
    stack.assert_end_state("term-shop")
