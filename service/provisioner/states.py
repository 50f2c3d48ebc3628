"""The store state machine, and the words for jobs: one place for each list.

`transition` is the only code that writes `Instance.status`. It allows exactly
the moves in TRANSITIONS; anything else is refused and logged on the store,
so a late or confused caller can never put a store where it cannot be.

    pending ─▶ running ◀─▶ stopped (admin hold)      any live state ─▶ failed
                  ▲  ╲                                any live state ─▶ needs_attention
                  │   ▶ suspended ─▶ cancelled ─▶ destroyed
                  └────────────────────┘ (paid again)
"""

from __future__ import annotations

import logging
from enum import StrEnum

from provisioner.models import Instance, LogEntry, utcnow

log = logging.getLogger(__name__)


class StoreState(StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"
    OUT_OF_STEP = "out_of_step"
    FAILED = "failed"
    NEEDS_ATTENTION = "needs_attention"
    DESTROYED = "destroyed"


class JobKind(StrEnum):
    EVENT = "event"          # apply one stored Stripe event
    RECONCILE = "reconcile"  # look at a store's billing again (end of grace)
    CONVERGE = "converge"    # bring a store to its desired state
    ACTION = "action"        # an admin's start/stop/restart/suspend/unsuspend
    DESTROY = "destroy"      # archive then remove a cancelled store
    NOTIFY = "notify"        # one email (detail: "notice|key")
    HEALTH = "health"        # the scheduled maintenance operations
    SYNC = "sync"
    NGINX = "nginx"
    CLEANUP = "cleanup"
    BACKUP = "backup"        # one store's backup (instance set) or every running store's
    RESTORE = "restore"      # put a backup back (detail: the Backup's id)
    CLONE = "clone"          # a new store from another's backup (detail: the Backup's id)
    DOMAIN = "domain"        # a custom domain's next step (detail: the CustomDomain's id)
    MOVE = "move"            # a store to another Docker host (detail: the host's name)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


S = StoreState
MAINTENANCE_KINDS = (JobKind.HEALTH, JobKind.SYNC, JobKind.NGINX, JobKind.CLEANUP)
# Jobs whose own module runs them (backups.run_job, domains.run_job).
CARE_KINDS = (JobKind.BACKUP, JobKind.RESTORE, JobKind.CLONE, JobKind.DOMAIN, JobKind.MOVE)
# States a store may be driven to by a playbook (what billing can ask for).
CONVERGED = frozenset({S.RUNNING, S.SUSPENDED, S.CANCELLED})
STOPPED_BY_BILLING = frozenset({S.SUSPENDED, S.CANCELLED})
# A live store can always fail, turn out to need an admin (a foreign container
# holds its name) or be destroyed (the worker only destroys what billing ended);
# nothing leaves destroyed; needs_attention is left only by an admin's retry.
_ALWAYS = frozenset({S.FAILED, S.NEEDS_ATTENTION, S.DESTROYED})
TRANSITIONS: dict[StoreState, frozenset[StoreState]] = {
    S.PENDING: frozenset({S.RUNNING, S.SUSPENDED, S.CANCELLED}),
    S.PROVISIONING: frozenset({S.RUNNING, S.STOPPED, S.SUSPENDED, S.CANCELLED,
                               S.OUT_OF_STEP}),
    S.RUNNING: frozenset({S.PROVISIONING, S.STOPPED, S.SUSPENDED, S.CANCELLED,
                          S.OUT_OF_STEP}),
    S.STOPPED: frozenset({S.PROVISIONING, S.RUNNING, S.SUSPENDED, S.CANCELLED,
                          S.OUT_OF_STEP}),
    S.SUSPENDED: frozenset({S.PROVISIONING, S.RUNNING, S.STOPPED, S.CANCELLED,
                            S.OUT_OF_STEP}),
    S.CANCELLED: frozenset({S.PROVISIONING, S.RUNNING, S.STOPPED, S.SUSPENDED,
                            S.OUT_OF_STEP}),
    S.OUT_OF_STEP: frozenset({S.PROVISIONING, S.RUNNING, S.STOPPED, S.SUSPENDED,
                              S.CANCELLED}),
    S.FAILED: frozenset({S.PROVISIONING, S.RUNNING, S.STOPPED, S.SUSPENDED, S.CANCELLED,
                         S.OUT_OF_STEP}),
    # An admin's retry, once the conflict is resolved (lifecycle.retry).
    S.NEEDS_ATTENTION: frozenset({S.FAILED}),
    S.DESTROYED: frozenset(),
}
for _state in S:
    if _state not in (S.NEEDS_ATTENTION, S.DESTROYED):
        TRANSITIONS[_state] |= _ALWAYS | {_state}


def allowed(current: str, target: str) -> bool:
    return StoreState(target) in TRANSITIONS[StoreState(current)]


def transition(instance: Instance, target: StoreState | str, message: str | None = None) -> bool:
    """Move a store to `target` (needs a db_session); False, logged, if the move is not allowed."""
    target = StoreState(target)
    if not allowed(instance.status, target):
        text = f"refused status change {instance.status} -> {target}" + \
            (f" ({message})" if message else "")
        LogEntry(instance=instance, level="warning", message=text)
        log.warning("store %s: %s", instance.subdomain, text)
        return False
    instance.status = target.value
    instance.status_message = message
    instance.updated_at = utcnow()
    return True
