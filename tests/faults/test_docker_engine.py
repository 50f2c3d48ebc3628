"""The Docker engine the stores live on stops in the middle of a batch, then starts
again. The engine is the test's own (socket, data root, exec root, pid file, bridge):
the machine's engine is never touched."""

from __future__ import annotations

import subprocess
import time

import pytest

from provisioner.testing.faults import RUN_DEADLINE, PrivateEngine, Stack, poll

pytestmark = [pytest.mark.integration, pytest.mark.faults]

IMAGE = "ebuilder-standin:latest"


@pytest.fixture(scope="module")
def engine(real_parts):
    private = PrivateEngine()
    private.clear_leftovers()
    try:
        private.start()
        private.load_image(IMAGE)
        yield private
    finally:
        private.remove()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, engine):
    """The stack on the private engine, whose store network exists already, as on any
    engine that holds stores. (Two stores of one batch on an engine without it both
    create it, and Docker then refuses the "ambiguous" name forever: reported apart.)"""
    world = Stack(tmp_path_factory.mktemp("faults"), "engine", docker_host=engine.url)
    try:
        subprocess.run(["docker", "-H", engine.url, "network", "create",
                        "--label", "ebuilder.managed=true",
                        "--label", f"ebuilder.installation={world.installation_id}",
                        world.network], check=True, capture_output=True)
        yield world.start()
    finally:
        world.close()


def test_engine_stopped_during_a_batch_then_started(stack, engine, measured):
    """The engine stays down longer than the stores' retries: they end failed, visibly,
    and once the engine is back an operator's retry brings them live (a failed store
    used to be a dead end: only a new Stripe event revived it)."""
    names = ["engine-a-shop", "engine-b-shop"]
    service = stack.service(PROVISIONER_INVENTORY=str(engine.inventory(stack.root / "hosts.yml")),
                            JOB_MAX_ATTEMPTS="2")
    checkouts, invoices = zip(*(stack.signup(name) for name in names), strict=True)
    service.deliver(list(checkouts) + list(invoices))
    # Mid-run: the stores' data dirs are made; their containers come next.
    poll(lambda: list(stack.customers.glob("*/.installation")), RUN_DEADLINE,
         "the batch to reach the stores' data dirs")
    engine.stop()
    stopped = time.monotonic()
    poll(lambda: all(stack.failed_for_good(n) for n in names), RUN_DEADLINE,
         "both stores to fail while the engine is down")
    measured("stores failed after the engine stopped", time.monotonic() - stopped)
    for name in names:
        detail = service.api("GET", f"/api/instances/{stack.store(name)['id']}/").json()
        assert detail["status"] == "failed" and detail["status_message"], detail

    engine.start()
    started = time.monotonic()
    for name in names:
        service.retry(stack.store(name)["id"])
    for name in names:
        stack.wait_live(name)
    measured("both live after the engine started and a retry", time.monotonic() - started)
    for name in names:
        stack.assert_end_state(name)
        assert stack.rows('SELECT docker_host FROM "Instance" WHERE subdomain = ?', name) == \
            [("private-engine",)]
