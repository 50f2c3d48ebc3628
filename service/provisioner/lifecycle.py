"""From what we know about billing, the state a store should be in.

This is the single place that decides; event handlers only record facts and
then call `reconcile`, so any order of the same events ends the same way.
"""

from __future__ import annotations

from provisioner import jobs
from provisioner.models import Instance, LogEntry

PENDING = "pending"
RUNNING = "running"


def desired_state(instance: Instance) -> str:
    """The state billing entitles this store to.

    A store runs once its checkout metadata (the instance itself) and a
    confirmed payment on its subscription are both known, whichever came first.
    """
    subscription = instance.subscription
    if subscription is None or not subscription.payment_confirmed:
        return PENDING
    return RUNNING


def reconcile(instance: Instance) -> None:
    """Record the desired state and queue the work that converges to it (needs a db_session)."""
    desired = desired_state(instance)
    if desired != instance.desired_state:
        LogEntry(instance=instance,
                 message=f"desired state {instance.desired_state} -> {desired}")
        instance.desired_state = desired
    if desired == RUNNING and instance.status != RUNNING:
        jobs.enqueue("converge", instance=instance)
    elif desired == RUNNING and instance.welcome_sent_at is None:
        jobs.enqueue("welcome_email", instance=instance)
