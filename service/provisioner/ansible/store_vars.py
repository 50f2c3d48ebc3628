"""What a playbook is told about one store: one typed record, never a secret.

The service's batches, the DB inventory (inventory/stores.py), bench/ and the
tests all build it here; `playbooks/group_vars/stores.yml` maps it to the
roles' inputs on the Ansible side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from provisioner import domains, store_plans
from provisioner.config import Config
from provisioner.models import Instance
from provisioner.plans import Plan
from provisioner.states import CONVERGED, StoreState

VHOST_OF_STATE = {StoreState.SUSPENDED: "suspended", StoreState.CANCELLED: "closed"}


@dataclass(frozen=True)
class StoreVars:
    name: str
    instance_id: str
    site_name: str
    admin_email: str
    port: int
    docker_host: str
    # None: the configured EBUILDER_IMAGE.
    image: str | None = None
    # For sync.yml, nginx.yml and the DB inventory: where the store should be.
    state: str | None = None
    # present | suspended | closed: the vhost nginx.yml renders.
    vhost: str | None = None
    # suspended | closed: the page suspend.yml shows.
    page: str | None = None
    # The tar.gz destroy.yml writes.
    archive: str | None = None
    # backup.yml: the tar.gz to write, and the older ones retention drops.
    backup: str | None = None
    backup_remove: tuple[str, ...] | None = None
    # restore.yml: the backup, its recorded SHA-256, entries not restored.
    restore_from: str | None = None
    restore_sha256: str | None = None
    restore_exclude: tuple[str, ...] | None = None
    # move.yml: the Docker host the store moves to, the archive made on its old host.
    move_to: str | None = None
    move_archive: str | None = None
    # Largest upload nginx accepts for this store (nginx size, e.g. "100m").
    upload_limit: str | None = None
    # The container limits of its plan (plans.Plan); 0: none.
    memory_mb: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    disk_mb: int | None = None
    # When the store uses more than a lowered limit: refuse (a plan change), keep (the
    # plan it has: limits never applied yet are not a failure), force (an admin said so).
    limits_excess: str | None = None
    # The customer's own domains (domains.for_store): {"name", "cert", "key"} each.
    custom_domains: tuple[dict, ...] | None = None

    def with_(self, **changes) -> StoreVars:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def of_instance(config: Config, instance: Instance, plan: Plan | None = None) -> StoreVars:
    """The store with the limits of `plan`, by default the plan its container has. A
    store whose plan left the plans file gets none: the role leaves its limits alone."""
    plan = plan or store_plans.current(config, instance)
    own_domains = tuple(domains.for_store(instance))
    return StoreVars(name=instance.subdomain, instance_id=str(instance.id),
                     site_name=instance.site_name, admin_email=instance.admin_email,
                     port=instance.port, docker_host=instance.docker_host, image=instance.image,
                     custom_domains=own_domains or None,
                     **({"limits_excess": "keep", **plan.limits()} if plan else {}))


def with_target(config: Config, instance: Instance) -> StoreVars:
    """The store plus the state it should be in: for sync, nginx and the DB inventory."""
    desired = instance.desired_state
    state = desired if desired in CONVERGED else instance.status
    if instance.admin_hold and state == StoreState.RUNNING:
        state = StoreState.STOPPED
    return of_instance(config, instance).with_(
        image=instance.image or config.ebuilder_image, state=str(state),
        vhost=VHOST_OF_STATE.get(state, "present"),
        page=VHOST_OF_STATE.get(state, "suspended"))
