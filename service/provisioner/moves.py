"""Moving a store to another Docker host (draining a host, balancing, retiring one).

One store per run of playbooks/move.yml: stopped, archived and verified on its old
host, copied, restored and started on the new one, its vhost switched, the old
container and data removed last. The store is down only for the copy; a failed move
leaves it on its old host, serving. The DB names the new host only once the run
says the store is there."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time

from pony.orm import commit, db_session, select

from provisioner import docker_hosts, jobs
from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import with_target
from provisioner.config import Config
from provisioner.models import Instance, Job, LogEntry, utcnow
from provisioner.states import JobKind, JobState, StoreState, transition

# A store with data and a container: moved in the state it is in.
MOVABLE = frozenset({StoreState.RUNNING, StoreState.STOPPED, StoreState.SUSPENDED})


class Refused(jobs.Final):
    """The move cannot be done as the store or the hosts stand; the message says why."""


def moving() -> set[int]:
    """Stores a move is working on now (needs a db_session): the maintenance jobs leave
    them alone (a sweep would start the stopped store on its old host mid-copy, cleanup
    take its new container for an orphan, a re-render point the vhost back)."""
    return set(select(j.instance.id for j in Job
                      if j.kind == JobKind.MOVE and j.state == JobState.RUNNING))


def check(config: Config, instance: Instance, target: str) -> docker_hosts.DockerHost:
    """The target host, if `instance` can move there now (needs a db_session)."""
    if not instance.live or instance.provisioned_at is None or \
            instance.status not in MOVABLE:
        raise Refused(f"store {instance.subdomain} is {instance.status}: only a running, "
                      "stopped or suspended store is moved")
    if target == instance.docker_host:
        raise Refused(f"store {instance.subdomain} is already on {target}")
    rooms = {row["name"]: row for row in docker_hosts.capacity(config)}
    room = rooms.get(target)
    if room is None or not room["listed"]:
        raise Refused(f"{target} is not a Docker host of {config.inventory_file} "
                      f"(hosts: {', '.join(sorted(n for n, r in rooms.items() if r['listed']))})")
    if room["draining"]:
        raise Refused(f"{target} is draining: no store is moved there")
    if room["free"] <= 0:
        raise Refused(f"{target} is full ({room['stores']} of {room['max_stores']} stores)")
    source, destination = (docker_hosts.host_of(config, instance.docker_host),
                           docker_hosts.host_of(config, target))
    if source.edge != destination.edge:
        raise Refused(f"{target}'s stores are served by {destination.edge}, this store's by "
                      f"{source.edge}: a move keeps its nginx host")
    return destination


def request_move(config: Config, instance: Instance, target: str) -> Job:
    """Queue moving a store to `target` (needs a db_session)."""
    check(config, instance, target)
    return jobs.enqueue(JobKind.MOVE, instance=instance, detail=target)


def _stash(config: Config) -> tuple[str, int]:
    """A private dir on this machine for the archive in transit (customer data), locked
    while its move runs; a killed move's stash is removed by the next move."""
    config.ansible_runs_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    for old in config.ansible_runs_dir.glob("move-*"):
        try:
            fd = os.open(old / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a move in another process is using it
        else:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    stash = tempfile.mkdtemp(prefix="move-", dir=config.ansible_runs_dir)  # 0700
    lock = os.open(f"{stash}/.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return stash, lock


def run_job(config: Config, job_id: int) -> str:
    """worker._care: one MOVE job. Checked again (the store or the hosts may have
    changed since it was asked); never tried twice, since each try stops the store and
    an interrupted one may have moved it: a failed move says why and an admin asks
    again."""
    with db_session:
        job = Job[job_id]
        instance, target = job.instance, job.detail or ""
        if job.logs.select(lambda e: e.message.startswith("move from")).exists():
            # A try of this job started and never ended (the worker died): where the
            # store's data is now is for an admin to see, never for a blind second try.
            raise Refused(f"an earlier try of moving {instance.subdomain} to {target} was "
                          "interrupted; see `provisioner sync --check` and the store's log "
                          "before asking again")
        check(config, instance, target)
        origin = instance.docker_host
        source = docker_hosts.host_of(config, origin)
        stamp = utcnow()
        archive = (f"{docker_hosts.backup_root(config, source)}/"
                   f"{instance.subdomain}-{instance.id}/{instance.subdomain}-move-"
                   f"{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond:06d}Z.tar.gz")
        store = with_target(config, instance).with_(move_to=target, move_archive=archive)
        instance_id = instance.id
        LogEntry(instance=instance, job=job, message=f"move from {origin} to {target} started")
    stash, lock = _stash(config)
    started = time.monotonic()
    try:
        result = operations.run(config, Operation.MOVE, [store], jobs={store.name: job_id},
                                extra_vars={"move_stash": stash})
    finally:
        shutil.rmtree(stash, ignore_errors=True)
        os.close(lock)
    outcome = result.hosts[store.name]
    moved_to = result.store_results.get(store.name, {}).get("docker_host")
    with db_session:
        instance = Instance[instance_id]
        if moved_to != target:
            LogEntry(instance=instance, level="error",
                     message=f"move to {target} failed, the store stays on {origin}: "
                             f"{outcome.error}")
            # The playbook put it back; a run that died on the way may not have: the
            # store is brought to its state on its old host (its data is still there:
            # play 3 removes it only after the store serves from the new host).
            transition(instance, StoreState.OUT_OF_STEP, f"move to {target} failed")
            jobs.enqueue(JobKind.CONVERGE, instance=instance)
            commit()  # kept, though the job fails
            raise Refused(f"move of {instance.subdomain} to {target} failed, it stays on "
                          f"{origin}: {outcome.error}")
        # It serves from the new host: that is where it is, whatever failed after.
        instance.docker_host = target
        took = time.monotonic() - started
        LogEntry(instance=instance, message=f"moved from {origin} to {target} in {took:.1f} s")
        if not outcome.ok:
            LogEntry(instance=instance, level="warning",
                     message=f"moved, but cleaning up on {origin} failed (its old container "
                             f"or archive may be left; `provisioner sync --check` shows "
                             f"them): {outcome.error}")
    return f"moved {store.name} from {origin} to {target}"
