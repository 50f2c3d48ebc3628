"""The welcome email: SMTP or outbox, retried on failure, never sent twice."""

import dataclasses
import email
from email import policy

from aiosmtpd.controller import Controller
from pony.orm import db_session

from provisioner import lifecycle, notifications
from provisioner.models import Instance, Job, utcnow
from provisioner.testing.stack import free_port
from provisioner.worker import Worker


class Sink:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(envelope.content)
        return "250 OK"


def running_store():
    with db_session:
        instance = Instance(subdomain="janes-shop", site_name="Jane's <Shop>",
                            admin_email="jane@example.com", admin_password="tmp-Pass_123",
                            port=19100, status="running", desired_state="running")
        lifecycle.notify(instance, "welcome")
        return instance.id


def test_outbox_gets_one_eml_with_the_login_details(config):
    instance_id = running_store()
    Worker(config).run_once()
    Worker(config).run_once()
    files = list(config.outbox_dir.glob("welcome-*.eml"))
    assert len(files) == 1
    message = email.message_from_bytes(files[0].read_bytes(), policy=policy.default)
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "https://janes-shop.stores.test/" in text and "tmp-Pass_123" in text
    assert "Jane&#39;s &lt;Shop&gt;" in html, "HTML must be escaped"
    with db_session:
        instance = Instance[instance_id]
        assert instance.welcome_sent_at is not None
        assert instance.admin_password is None
    for f in files:
        f.unlink()


def test_smtp_down_is_retried_and_sends_exactly_once(config):
    port = free_port()
    smtp_config = dataclasses.replace(config, email_host="127.0.0.1", email_port=port,
                                      job_retry_base_seconds=60)
    instance_id = running_store()
    Worker(smtp_config).run_once()
    with db_session:
        job = Job.select(lambda j: j.kind == "notify").first()
        assert job.state == "queued" and job.attempts == 1
        assert "Connection refused" in job.last_error or "Errno" in job.last_error
        assert Instance[instance_id].admin_password == "tmp-Pass_123"
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with db_session:
            job = Job.select(lambda j: j.kind == "notify").first()
            job.next_run_at = utcnow()  # the backoff has passed
        Worker(smtp_config).run_once()
        with db_session:
            assert Job[job.id].state == "done"
            lifecycle.notify(Instance[instance_id], "welcome")
        Worker(smtp_config).run_once()
    finally:
        controller.stop()
    assert len(sink.messages) == 1
    with db_session:
        assert Instance[instance_id].welcome_sent_at is not None
        assert not notifications.send_welcome(smtp_config, Instance[instance_id])
