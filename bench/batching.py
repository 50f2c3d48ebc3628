"""N stores provisioned one ansible run each, beside the same N in one batched run (as
the worker batches every due store): what batching buys. What used to be
bench/provision_batching.py; its stores have no DB rows, so it runs last."""

from __future__ import annotations

import secrets
import time

from pony.orm import db_session, select

from bench.stack import BenchError, BenchStack
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars
from provisioner.models import Instance


def _stores(stack: BenchStack, kind: str, count: int, used: set[int]) -> list[StoreVars]:
    made = []
    for n in range(count):
        port = stack.ports.take(used)
        used.add(port)
        name = f"{stack.prefix}-{kind}{n}"
        made.append(StoreVars(name=name, instance_id=name, site_name=f"Bench {kind} {n}",
                              admin_email=f"{name}@example.com", port=port,
                              docker_host="localhost"))
    return made


def _provision(stack: BenchStack, batch: list[StoreVars]) -> None:
    result = operations.run(stack.config, Operation.PROVISION, batch,
                            secrets={s.name: {"admin_password": secrets.token_urlsafe(12)}
                                     for s in batch})
    failed = [f"{name}: {h.error}" for name, h in result.hosts.items() if not h.ok]
    if failed:
        raise BenchError(f"batching run {result.ident}: {failed[0]}")


def compare(stack: BenchStack, count: int) -> tuple[float, float]:
    """(seconds for one run each, seconds for one batched run)."""
    with db_session:
        used = set(select(i.port for i in Instance if i.live))
    one_by_one = _stores(stack, "solo", count, used)
    batched = _stores(stack, "batch", count, used)
    started = time.perf_counter()
    for store in one_by_one:
        _provision(stack, [store])
    separate = time.perf_counter() - started
    started = time.perf_counter()
    _provision(stack, batched)
    return separate, time.perf_counter() - started
