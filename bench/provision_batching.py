"""Benchmark: N stores provisioned in one ansible run vs one run per store.

Ansible's start-up and per-task overhead dominate a run, so the worker batches
every due store into one run. This measures what that buys, in one process,
on real Docker and nginx (a private nginx on loopback ports):

    .venv/bin/python bench/provision_batching.py --stores 6

Prints both wall times and their ratio. Needs the stand-in image
(scripts/setup.sh builds it). Cleans up its containers.
"""

from __future__ import annotations

import argparse
import time

from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars
from provisioner.testing.stack import local_stack


def stores(prefix: str, count: int, first_port: int) -> list[StoreVars]:
    return [StoreVars(name=f"{prefix}-{n}", instance_id=f"{prefix}-{n}", site_name=f"Bench {n}",
                      admin_email=f"bench{n}@example.com", port=first_port + n,
                      docker_host="localhost") for n in range(count)]


def secrets_for(batch: list[StoreVars]) -> dict:
    return {s.name: {"admin_password": "bench-first-boot"} for s in batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=int, default=6)
    args = parser.parse_args()
    with local_stack("bench-batching") as config:
        one_by_one = stores("solo", args.stores, 19500)
        batched = stores("batch", args.stores, 19600)
        started = time.perf_counter()
        for store in one_by_one:
            result = operations.run(config, Operation.PROVISION, [store],
                                    secrets=secrets_for([store]))
            assert result.hosts[store.name].ok, result.hosts
        separate = time.perf_counter() - started
        started = time.perf_counter()
        result = operations.run(config, Operation.PROVISION, batched,
                                secrets=secrets_for(batched))
        assert all(h.ok for h in result.hosts.values()), result.hosts
        together = time.perf_counter() - started
    print(f"{args.stores} stores, one run each: {separate:.1f} s "
          f"({separate / args.stores:.2f} s per store)")
    print(f"{args.stores} stores, one batched run: {together:.1f} s "
          f"({together / args.stores:.2f} s per store)")
    print(f"batching is {separate / together:.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
