"""Periodic maintenance inside `provisioner serve`, through the same job queue
as everything else (so never two of one kind at once); and alert delivery, which
is no job: a thread of its own calls alerts.deliver_due every ALERT_SECONDS."""

from __future__ import annotations

import logging
import threading

import schedule
from pony.orm import db_session

from provisioner import alerts, domains, jobs
from provisioner.config import Config

log = logging.getLogger(__name__)

ALERT_SECONDS = 20


def build(config: Config, wake: threading.Event) -> schedule.Scheduler:
    scheduler = schedule.Scheduler()

    def queue(kind: str) -> None:
        with db_session:
            jobs.enqueue(kind)
        wake.set()
        log.info("scheduled %s queued", kind)

    scheduler.every(config.health_interval_minutes).minutes.do(queue, "health")
    scheduler.every(config.sync_interval_minutes).minutes.do(queue, "sync")
    scheduler.every().day.at(config.cleanup_at).do(queue, "cleanup")
    # Certificates of customers' domains due for renewal (only queues jobs).
    scheduler.every(6).hours.do(renew_certificates, config)
    if config.backup_at != "off":
        scheduler.every().day.at(config.backup_at).do(queue, "backup")
    return scheduler


def renew_certificates(config: Config) -> int:
    """Queue the renewals due; a failure is logged and the next round tries again."""
    try:
        queued = domains.renew_due(config)
    except Exception:  # a locked DB: the next round is hours away, not never
        log.exception("queueing certificate renewals failed")
        return 0
    if queued:
        log.info("%d certificate renewal(s) queued", queued)
    return queued


def deliver_alerts(config: Config) -> int:
    """One round of alert delivery; a failure is logged and the next round tries again."""
    try:
        return alerts.deliver_due(config)
    except Exception:  # a locked DB, a bad template: never the end of alerting
        log.exception("alert delivery round failed")
        return 0


def run(config: Config, stop: threading.Event, wake: threading.Event) -> threading.Thread:
    """The schedule's thread (returned) and the alerts' thread beside it: a webhook
    that takes its whole timeout never delays a scheduled job."""
    scheduler = build(config, wake)

    def deliver() -> None:
        while not stop.is_set():
            deliver_alerts(config)
            stop.wait(ALERT_SECONDS)

    threading.Thread(target=deliver, name="provisioner-alerts", daemon=True).start()

    def loop() -> None:
        while not stop.is_set():
            try:
                scheduler.run_pending()
            except Exception:  # a failed enqueue must not stop later runs
                log.exception("scheduler tick failed")
            stop.wait(1)

    thread = threading.Thread(target=loop, name="provisioner-scheduler", daemon=True)
    thread.start()
    return thread
