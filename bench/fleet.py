"""A fleet of running stores, made in bulk through the real roles.

Each store gets what a signup leaves behind (a customer, an active paid
subscription, a live `Instance` with its port, `provisioned_at` and welcome sent),
then one `operations.run(PROVISION)` per chunk builds their containers and vhosts,
so `maintenance.health_sweep` (live, running, not held), `regenerate_vhosts` (live,
provisioned) and the admin API see stores like any other.
"""

from __future__ import annotations

import secrets
import time

from pony.orm import db_session, flush, select

from bench.stack import BenchError, BenchStack, log
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import of_instance
from provisioner.models import Customer, Instance, Subscription, utcnow


def running_stores() -> list[Instance]:
    """Needs a db_session: what health_sweep checks, in its order."""
    return list(Instance.select(lambda i: i.live and i.status == "running"
                                and not i.admin_hold).order_by(Instance.id))


def running_count() -> int:
    with db_session:
        return len(running_stores())


def grow(stack: BenchStack, target: int, chunk: int) -> tuple[int, float]:
    """Make running stores until there are `target`; (how many made, seconds)."""
    missing = target - running_count()
    if missing <= 0:
        return 0, 0.0
    started = time.perf_counter()
    made = 0
    while made < missing:
        count = min(chunk, missing - made)
        ids = _rows(stack, made, count)
        with db_session:
            stores = [of_instance(stack.config, Instance[i]) for i in ids]
        log(f"fleet: provisioning stores {made + 1}-{made + count} of {missing} "
            f"in one playbook run")
        result = operations.run(stack.config, Operation.PROVISION, stores,
                                secrets={s.name: {"admin_password": secrets.token_urlsafe(12)}
                                         for s in stores})
        failed = {name: h.error for name, h in result.hosts.items() if not h.ok}
        if failed:
            name, error = next(iter(failed.items()))
            raise BenchError(f"fleet: {len(failed)} store(s) failed to provision "
                             f"(run {result.ident}), e.g. {name}: {error}")
        with db_session:
            now = utcnow()
            for i in ids:
                instance = Instance[i]
                instance.status = "running"
                instance.provisioned_at = instance.welcome_sent_at = now
        made += count
    return made, time.perf_counter() - started


def _rows(stack: BenchStack, offset: int, count: int) -> list[int]:
    ids = []
    with db_session:
        used = set(select(i.port for i in Instance if i.live))
        for n in range(offset, offset + count):
            subdomain = f"{stack.prefix}-f{n}"
            customer = Customer(stripe_id=f"cus_{secrets.token_hex(8)}",
                                email=f"{subdomain}@example.com")
            subscription = Subscription(stripe_id=f"sub_{secrets.token_hex(8)}",
                                        customer=customer,
                                        stripe_customer_id=customer.stripe_id, status="active",
                                        payment_confirmed=True, status_at=utcnow(),
                                        current_period_start=utcnow())
            port = stack.ports.take(used)
            used.add(port)
            # Provisioning until its container is up: nothing else picks it up meanwhile
            # (the desired state is met, so no converge is queued either).
            instance = Instance(subdomain=subdomain, site_name=f"Fleet store {n}",
                                admin_email=f"{subdomain}@example.com", customer=customer,
                                subscription=subscription, port=port, status="provisioning",
                                desired_state="running")
            flush()
            ids.append(instance.id)
    return ids
