"""Store jobs turned into operations: which stores go into which run, and what a
store's success means. Converge, admin actions and destroy jobs that are due
together share one ansible run per operation (Ansible's start-up dominates).

Planning reads the DB in one short transaction; the worker then runs the
batch with no transaction open, and records each store's outcome in its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pony.orm import db_session

from provisioner import docker_hosts, domains, jobs, lifecycle, store_plans
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import VHOST_OF_STATE, StoreVars, of_instance
from provisioner.config import Config
from provisioner.models import Instance, Job, utcnow
from provisioner.states import CONVERGED, STOPPED_BY_BILLING, StoreState, transition

# Admin action -> (operation, store vars it needs).
ADMIN_ACTIONS: dict[str, tuple[Operation, dict]] = {
    "start": (Operation.START, {}),
    "stop": (Operation.STOP, {}),
    "restart": (Operation.RESTART, {}),
    "suspend": (Operation.SUSPEND, {"page": "suspended"}),
    "unsuspend": (Operation.PROVISION, {}),
}


@dataclass
class Batch:
    """One ansible run: the jobs' stores, and what success means for each store."""

    operation: Operation
    on_success: Callable[[Instance], None]
    jobs: dict[int, StoreVars] = field(default_factory=dict)
    secrets: dict[str, dict] = field(default_factory=dict)
    # Converge jobs: the plan each store is given (a refusal names it).
    plans: dict[int, store_plans.Plan] = field(default_factory=dict)  # only plan changes

    def add(self, job: Job, store: StoreVars) -> None:
        instance = job.instance
        self.jobs[job.id] = store
        if instance.admin_password:
            self.secrets[store.name] = {"admin_password": instance.admin_password}
        instance.status_message = f"running {self.operation}"
        instance.updated_at = utcnow()


def _needs_no_run(config: Config, instance: Instance) -> bool:
    desired = instance.desired_state
    return (not instance.live or desired not in CONVERGED
            or (instance.status == desired and not store_plans.change_pending(config, instance))
            or (desired == StoreState.RUNNING and instance.admin_hold))


def plan_converge(config: Config, job_ids: list[int]) -> list[Batch]:
    """Stores to bring to their desired state and plan, one batch per target state."""
    batches: dict[str, Batch] = {}
    plans: dict[int, store_plans.Plan | None] = {}

    def converged(instance: Instance, desired: StoreState) -> None:
        if plans[instance.id] is not None:
            store_plans.applied(instance, plans[instance.id])
        lifecycle.converged(instance, desired)

    with db_session:
        for job_id in job_ids:
            job = Job[job_id]
            instance = job.instance
            desired = StoreState(instance.desired_state) if instance.live else None
            if _needs_no_run(config, instance):
                jobs.complete(job)
            elif desired in STOPPED_BY_BILLING and instance.provisioned_at is None:
                transition(instance, desired)  # never built: nothing to stop, nobody to tell
                jobs.complete(job)
            else:
                if desired not in batches:
                    batches[desired] = Batch(
                        Operation.PROVISION if desired == StoreState.RUNNING
                        else Operation.SUSPEND,
                        on_success=lambda i, d=desired: converged(i, d))
                if desired == StoreState.CANCELLED:
                    # Its own domains go with the closing: certificates now, vhost and
                    # ALLOWED_HOSTS with this converge.
                    domains.store_ended(config, instance)
                plans[instance.id] = plan = store_plans.wanted(config, instance)
                changing = plan is not None and plan != store_plans.current(config, instance)
                batches[desired].add(job, of_instance(config, instance, plan).with_(
                    page=VHOST_OF_STATE.get(desired),
                    limits_excess="force" if instance.plan_force else
                    "refuse" if changing else "keep"))
                if changing:
                    batches[desired].plans[job_id] = plan
    return list(batches.values())


def plan_actions(config: Config, job_ids: list[int]) -> tuple[list[Batch], list[tuple[int, str]]]:
    """Admin actions, one batch per action; and the jobs that cannot run, with why."""
    batches: dict[str, Batch] = {}
    refused: list[tuple[int, str]] = []
    with db_session:
        for job_id in job_ids:
            job = Job[job_id]
            action = job.detail or ""
            if action not in ADMIN_ACTIONS:
                refused.append((job_id, f"unknown action {action!r}"))
                continue
            operation, extra = ADMIN_ACTIONS[action]
            if action not in batches:
                batches[action] = Batch(operation,
                                        on_success=lambda i, a=action: _acted(config, i, a))
            batches[action].add(job, of_instance(config, job.instance).with_(**extra))
    return list(batches.values()), refused


def _acted(config: Config, instance: Instance, action: str) -> None:
    """An admin action went through; a plan change that waited for a held store's
    Start follows it."""
    lifecycle.acted(instance, action)
    if store_plans.change_pending(config, instance):
        lifecycle.reconcile(instance, config)


def plan_destroy(config: Config, job_ids: list[int]) -> list[Batch]:
    """Cancelled stores past their deletion date: archive (verified), then remove."""
    stamp = utcnow().strftime("%Y%m%dT%H%M%S")
    archives: dict[int, str] = {}

    def archived(instance: Instance) -> None:
        lifecycle.destroyed(instance, archives[instance.id])

    batch = Batch(Operation.DESTROY, on_success=archived)
    with db_session:
        for job_id in job_ids:
            job = Job[job_id]
            instance = job.instance
            if not instance.live or instance.desired_state != StoreState.CANCELLED:
                jobs.complete(job)  # re-subscribed or already gone
            elif instance.provisioned_at is None:
                lifecycle.destroyed(instance, None)
                jobs.complete(job)
            else:
                domains.store_ended(config, instance)
                root = docker_hosts.backup_root(
                    config, docker_hosts.host_of(config, instance.docker_host))
                archives[instance.id] = f"{root}/{instance.subdomain}-{instance.id}-{stamp}.tar.gz"
                batch.add(job, of_instance(config, instance).with_(archive=archives[instance.id]))
    return [batch] if batch.jobs else []
