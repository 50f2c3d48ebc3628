"""Operations by name: the only map from what the service wants done to a playbook.

Every run goes through `run`, which records it (an AnsibleRun row, its task
events streamed into the provisioning log as they happen) and returns each
store's outcome. Tests swap `BACKEND` for a recorder that runs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

from provisioner.ansible import recording
from provisioner.ansible.runner import RunResult, run_playbook
from provisioner.ansible.store_vars import StoreVars
from provisioner.config import Config


class Operation(StrEnum):
    PROVISION = "provision"  # create or converge, running, behind its vhost
    START = "start"
    STOP = "stop"            # container stopped, vhost kept
    RESTART = "restart"
    SUSPEND = "suspend"      # stopped behind the suspended/closed page
    DESTROY = "destroy"      # archive, verify, then remove everything
    HEALTH = "health"        # container running and /health/ 200 through nginx
    NGINX = "nginx"          # every vhost for its state, one reload per host
    SYNC = "sync"            # every store to its state
    BACKUP = "backup"        # a verified archive of each store's data dir
    RESTORE = "restore"      # a backup put back (or into a clone), the store started
    MOVE = "move"            # to another Docker host: archive, copy, restore, switch vhost


PLAYBOOKS = {operation: f"{operation.value}.yml" for operation in Operation}
# Runs whose good news nobody reads: only failed and changed tasks reach the log,
# and a run every store passed leaves no artifacts (a 5-minute health sweep
# would otherwise keep ~18 KB in 7 files per store per sweep).
QUIET = frozenset({Operation.HEALTH})
BACKEND = run_playbook


def run(config: Config, operation: Operation, stores: Iterable[StoreVars], *,
        secrets: dict | None = None, jobs: dict[str, int] | None = None,
        redact: Iterable[str] = (), cancel: Callable[[], bool] | None = None,
        extra_vars: dict | None = None) -> RunResult:
    """Run one operation over `stores` in one ansible run, recorded.

    `secrets` maps a store name to its first-boot password; `jobs` maps a store
    name to the job the run is for (linked to the run and its log); `cancel`
    answers True when the run must end now (the worker is stopping)."""
    records = [store.as_dict() for store in stores]
    if Operation(operation) == Operation.PROVISION and records and \
            all((secrets or {}).get(s["name"], {}).get("admin_password") for s in records):
        # New stores only (each has its first-boot password): none can be in step,
        # so provision.yml skips checking (its cost is a signup's).
        extra_vars = {"provision_every_store": True, **(extra_vars or {})}
    return recording.recorded_run(config, PLAYBOOKS[Operation(operation)], records, secrets,
                                  runner=BACKEND, jobs=jobs or {}, redact_values=list(redact),
                                  cancel=cancel, extra_vars=extra_vars,
                                  quiet=Operation(operation) in QUIET)
