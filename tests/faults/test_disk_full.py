"""The filesystem of the store data (CUSTOMER_DATA_ROOT) or of the service's own data
dir (the SQLite file, run artifacts) fills up during a run; then space is freed."""

from __future__ import annotations

import json
import time

import pytest

from provisioner.testing.faults import RUN_DEADLINE, Stack, fill, poll, processes_mentioning

pytestmark = [pytest.mark.integration, pytest.mark.faults]

NO_SPACE = "No space left on device"


def log_since(service, offset: int) -> str:
    with open(service.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, real_parts):
    """The module's stack with both data dirs on small tmpfs mounts of their own."""
    world = Stack(tmp_path_factory.mktemp("faults"), "diskfull")
    try:
        world.mount_tmpfs(world.data_dir, "32m")
        world.mount_tmpfs(world.customers, "4m")
        world.start()
        yield world
    finally:
        world.close()


def test_store_data_disk_full_fails_visibly_then_the_store_goes_live(stack, measured):
    """The store's data dir cannot be written: the reason shows on the store (DB and
    admin API) while it lasts, and the store goes live once space is freed."""
    service = stack.service()
    filler = fill(stack.customers)
    try:
        service.deliver(stack.signup("full-disk-shop"))
        poll(lambda: NO_SPACE in stack.errors_of("full-disk-shop"), RUN_DEADLINE,
             "the store to show that its disk is full")
        store_id = stack.store("full-disk-shop")["id"]
        detail = service.api("GET", f"/api/instances/{store_id}/")
        assert detail.status == 200 and NO_SPACE in json.dumps(detail.json()), detail
    finally:
        filler.unlink()
    freed = time.monotonic()
    how = stack.recover(service, "full-disk-shop")
    measured(f"live after space was freed ({how})", time.monotonic() - freed)
    stack.assert_end_state("full-disk-shop")


def test_service_disk_full_refuses_webhooks_without_500_and_loses_nothing(stack, measured):
    """The disk of the SQLite file and the run artifacts fills while a store's run is on:
    Stripe's deliveries meanwhile are refused (503/4xx with a reason, never 500), the
    service lives through it, and once space is freed both stores go live and every
    event is recorded once."""
    service = stack.service()
    earlier = [name for name in ("full-disk-shop",) if stack.live(name)]
    service.deliver(stack.signup("before-full-shop"))
    run = stack.wait_run()
    late = stack.signup("while-full-shop")
    log_from = service.log_path.stat().st_size
    filler = fill(stack.data_dir)
    try:
        answers = [service.webhook(evt) for evt in late]
        poll(lambda: not processes_mentioning(run["ident"]), RUN_DEADLINE,
             "the run caught by the full disk to end")
        # The worker deals with the run's end while the disk is still full (its log
        # says so, as the DB cannot): it keeps trying to record it.
        poll(lambda: any(mark in log_since(service, log_from) for mark in (
            "provisioner.worker", f"recording the end of ansible run {run['ident']}")), 30,
             "the worker to handle the end of the run")
        assert service.running(), service.log_tail()
    finally:
        filler.unlink()
    for evt, answer in zip(late, answers, strict=True):
        assert answer.status == 503 or 400 <= answer.status < 500, \
            f"{evt['type']} with the database's disk full: {answer}"
        assert isinstance(answer.json(), dict) and answer.json().get("error"), answer
    freed = time.monotonic()
    service.deliver(late)  # Stripe's next retry
    for name in ("before-full-shop", "while-full-shop"):
        how = stack.recover(service, name)
        measured(f"{name} live after space was freed ({how})", time.monotonic() - freed)
    for name in ("before-full-shop", "while-full-shop", *earlier):
        stack.assert_end_state(name)
    errors = stack.errors_of("before-full-shop")
    assert NO_SPACE in errors or "disk is full" in errors, \
        f"the failed run left no visible reason: {errors!r}"
