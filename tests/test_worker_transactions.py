"""No transaction spans a playbook run: webhooks are answered while the worker runs one."""

from __future__ import annotations

import threading
import urllib.request

from cheroot import wsgi
from pony.orm import db_session

from provisioner.ansible import operations
from provisioner.models import Instance, StripeEvent, utcnow
from provisioner.states import JobKind
from provisioner.testing import stripe_events
from provisioner.testing.stack import free_port, wait_for_port
from provisioner.web import create_app
from provisioner.worker import Worker
from tests.conftest import WEBHOOK_SECRET, RecordingRunner


class SlowRunner(RecordingRunner):
    """A playbook that takes `seconds`; says when it has started."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.started = threading.Event()
        self.finished = threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.set()
        threading.Event().wait(self.seconds)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.finished.set()


def test_webhooks_are_answered_while_a_health_sweep_runs(config):
    from provisioner import jobs

    with db_session:
        Instance(subdomain="busy-shop", site_name="Busy", admin_email="b@example.com",
                 port=19101, status="running", desired_state="running",
                 provisioned_at=utcnow())
        jobs.enqueue(JobKind.HEALTH)
    runner = operations.BACKEND = SlowRunner(5)
    port = free_port()
    server = wsgi.Server(("127.0.0.1", port), create_app(config), numthreads=4)
    threading.Thread(target=server.start, daemon=True).start()
    wait_for_port(port)
    worker = threading.Thread(target=Worker(config).run_once, daemon=True)
    worker.start()
    try:
        assert runner.started.wait(30), "the health sweep never started its playbook"
        answered = []
        for _ in range(5):
            evt = stripe_events.event("customer.created", stripe_events.resource("customer"))
            payload = stripe_events.encode(evt)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/webhook/stripe/", data=payload, method="POST",
                headers={"Stripe-Signature": stripe_events.sign(payload, WEBHOOK_SECRET)})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
            answered.append(not runner.finished.is_set())
        # Every webhook was stored and answered while the playbook was still running.
        assert answered == [True] * 5
        with db_session:
            assert StripeEvent.select().count() == 5
    finally:
        worker.join(timeout=30)
        server.stop()
    assert runner.runs and runner.runs[0][0] == "health.yml"
