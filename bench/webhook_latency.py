"""Webhook acknowledgement latency at a fixed rate: the service (worker running, applying
every event it acknowledges) beside the floor app (signature check, 200); and the
service's own latency while its worker runs a health sweep, beside the same service
idle at the same rate (what used to be bench/webhook_during_sweep.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pony.orm import db_session, flush

from bench import load
from bench.stack import BenchError, BenchStack
from provisioner import jobs
from provisioner.models import Job
from provisioner.states import JobKind

SERVICE_PATH = "/api/webhook/stripe/"
FLOOR_PATH = "/webhook"


@dataclass
class Ack:
    floor: load.LoadResult
    service: load.LoadResult
    drain_seconds: float


def _checked(result: load.LoadResult, what: str) -> load.LoadResult:
    if not result.ok:
        raise BenchError(f"{what}: no webhook was acknowledged ({result.describe()})")
    return result


def ack(stack: BenchStack, rate: float, seconds: float, drain_timeout: float) -> Ack:
    floor = _checked(load.for_seconds(stack.floor_port, FLOOR_PATH, stack.webhook_secret,
                                      rate, seconds), "floor app")
    service = _checked(load.for_seconds(stack.service_port, SERVICE_PATH,
                                        stack.webhook_secret, rate, seconds), "service")
    # The worker applies what it acknowledged; later figures start from a quiet queue.
    drain = stack.wait_idle(drain_timeout, f"the worker to apply {service.ok} events")
    return Ack(floor, service, drain)


@dataclass
class DuringSweep:
    idle: load.LoadResult
    during: load.LoadResult
    sweep_seconds: float


def during_sweep(stack: BenchStack, rate: float, idle_seconds: float,
                 timeout: float) -> DuringSweep:
    """Webhooks at `rate` with the worker idle, then while it runs a queued health sweep
    (as the scheduler inside `serve` queues it); the sweep's time from queued to done."""
    idle = _checked(load.for_seconds(stack.service_port, SERVICE_PATH, stack.webhook_secret,
                                     rate, idle_seconds), "service idle")
    stack.wait_idle(timeout)
    with db_session:
        job = jobs.enqueue(JobKind.HEALTH)
        flush()
        job_id = job.id
    queued = time.perf_counter()
    done_at: list[float] = []
    last_check = 0.0

    def sweeping(sent: int, elapsed: float) -> bool:
        nonlocal last_check
        if done_at:
            return False
        if time.perf_counter() - last_check < 0.1:
            return True
        last_check = time.perf_counter()
        if elapsed > timeout:
            raise BenchError(f"the health sweep took more than {timeout:.0f} s")
        with db_session:
            state, error = Job[job_id].state, Job[job_id].last_error
        if state == "failed":
            raise BenchError(f"the health sweep job failed: {error}")
        if state == "done":
            done_at.append(last_check)
            return False
        return True

    # The webhooks wake the worker, as they do in production.
    during = _checked(load.fixed_rate(stack.service_port, SERVICE_PATH, stack.webhook_secret,
                                      rate, sweeping), "service during the sweep")
    stack.wait_idle(timeout)
    return DuringSweep(idle, during, done_at[0] - queued)
