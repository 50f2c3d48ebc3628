"""Periodic maintenance inside `provisioner serve`, through the same job queue
as everything else (so never two of one kind at once)."""

from __future__ import annotations

import logging
import threading

import schedule
from pony.orm import db_session

from provisioner import jobs
from provisioner.config import Config

log = logging.getLogger(__name__)


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
    if config.backup_at != "off":
        scheduler.every().day.at(config.backup_at).do(queue, "backup")
    return scheduler


def run(config: Config, stop: threading.Event, wake: threading.Event) -> threading.Thread:
    scheduler = build(config, wake)

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
