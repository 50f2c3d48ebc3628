"""Converging N unchanged running stores: one provision.yml run over all of them (what
a Retry, a sync or an upgrade of many stores costs when nothing needs doing: each
host checks its stores at once and leaves them), beside the floor: the same playbook
over a single store; and what the same stores cost through the roles."""

from __future__ import annotations

import time

from pony.orm import db_session

from bench.fleet import running_stores
from bench.stack import BenchError, BenchStack
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars, of_instance


def stores(stack: BenchStack, count: int) -> list[StoreVars]:
    with db_session:
        return [of_instance(stack.config, i) for i in running_stores()[:count]]


def converge(stack: BenchStack, batch: list[StoreVars],
             every_store: bool = False) -> tuple[float, int]:
    """Seconds for one provision run over `batch`, and how many stores it changed;
    `every_store`: each through the roles, none left alone as in step."""
    started = time.perf_counter()
    result = operations.run(stack.config, Operation.PROVISION, batch,
                            extra_vars={"provision_every_store": True} if every_store else None)
    seconds = time.perf_counter() - started
    failed = {name: h.error for name, h in result.hosts.items() if not h.ok}
    if failed:
        name, error = next(iter(failed.items()))
        raise BenchError(f"converge run {result.ident}: {len(failed)} store(s) failed, "
                         f"e.g. {name}: {error}")
    return seconds, sum(1 for h in result.hosts.values() if h.changed)
