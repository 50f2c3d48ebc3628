#!/usr/bin/python
"""A consistent, checksummed, verified backup of a store's data dir on its Docker host."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ebuilder_instance_backup
short_description: Back up a store's data dir into a verified tar.gz
description:
  - Writes O(archive) (a tar.gz whose one top directory C(data/) is the store's data dir)
    and C(<archive>.sha256) beside it (C(sha256sum -c) reads it), then reads the whole
    archive back and checks its checksum before saying it is made.
  - Consistency. When the running container's image declares a dump command (label
    O(dump_label)), it is run in the container first (it writes a consistent dump under
    C(/app/db)) and nothing is paused. Otherwise the running container is paused while
    O(pause_paths) (its database files) are copied aside, at most O(max_pause_seconds),
    and is always unpaused (a watchdog ends a slower copy, which fails the backup; a run
    killed while the store is paused leaves a mark, and the next backup unpauses it);
    the archive takes that copy (C(cp -a): owners and modes kept). A stopped store is at
    rest.
  - Retention. The archives in O(remove) are deleted (only C(.tar.gz) files in the
    archive's own directory, never the new one).
  - Second location. With O(copy_to) (a path on this host, or an rsync target
    C(user@host:/path)), the archive's directory is mirrored to C(<copy_to>/<dir name>/)
    with rsync, deleting there at most what retention just removed (C(--max-delete)), so
    the copy follows the same retention but never empties because this host's dir was
    lost. A failed copy does not fail the backup; it is returned in RV(copy_error).
options:
  docker_host:
    description: The Docker API, C(unix://path) or C(tcp://host:port) (plain HTTP).
    type: str
    default: unix:///var/run/docker.sock
  container:
    description: The store's container.
    type: str
    required: true
  data_dir:
    description: The store's data dir.
    type: path
    required: true
  archive:
    description: The tar.gz to write; must not exist.
    type: path
    required: true
  pause_paths:
    description: Entries of O(data_dir) copied while the container is paused.
    type: list
    elements: str
    default: [db]
  max_pause_seconds:
    description: Longest the container may stay paused; a slower copy fails the backup.
    type: int
    default: 10
  dump_label:
    description: Image label naming a shell command that writes a consistent dump.
    type: str
    default: ebuilder.backup.dump
  remove:
    description: Older archives to delete (retention).
    type: list
    elements: path
    default: []
  copy_to:
    description: A second location (path or rsync target); empty for none.
    type: str
    default: ""
  timeout:
    description: Seconds for each Docker API request, and for the dump command.
    type: int
    default: 120
author:
  - eBuilder Provisioner
"""

EXAMPLES = r"""
- name: Back up the store.
  ebuilder_instance_backup:
    container: ebuilder_janes-shop
    data_dir: /srv/ebuilder/customers/42
    archive: /srv/ebuilder/backups/janes-shop-42/janes-shop-20261203T020000Z.tar.gz
    copy_to: backup@vault.internal:/srv/copies
"""

RETURN = r"""
archive:
  description: The archive written.
  returned: success
  type: str
sha256:
  description: Its SHA-256, also in C(<archive>.sha256).
  returned: success
  type: str
size_bytes:
  description: Its size.
  returned: success
  type: int
mode:
  description: How it was made consistent, C(dump), C(pause) or C(at rest).
  returned: success
  type: str
paused_seconds:
  description: How long the container was paused (0 unless O(mode=pause)).
  returned: success
  type: float
removed:
  description: The older archives deleted.
  returned: success
  type: list
  elements: str
copy_path:
  description: Where the second copy is; empty without O(copy_to) or when it failed.
  returned: success
  type: str
copy_error:
  description: Why the second copy failed; empty when it did not.
  returned: success
  type: str
"""

import http.client  # noqa: E402 (Ansible wants the documentation first)
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.ebuilder_archive import (  # noqa: E402
    TOP,
    checksum_file,
    sha256_of,
    verify,
    write_checksum,
)
from ansible.module_utils.ebuilder_docker import docker_request  # noqa: E402


class BackupFailed(Exception):
    pass


# Written before the container is paused and removed once it is unpaused: a run killed
# in between leaves it, and the next backup unpauses the container it names.
PAUSE_MARK = ".backup-paused"


def copy_within(source: str, target: str, seconds: float) -> None:
    """`cp -a` (owners, modes, times, links as they are), ended after `seconds`."""
    try:
        done = subprocess.run(["cp", "-a", source, target], capture_output=True, text=True,
                              timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        raise BackupFailed("copying the database files took longer than allowed; the "
                           "container was unpaused and nothing was kept") from None
    if done.returncode != 0:
        raise BackupFailed(f"copying the database files failed: {done.stderr.strip()[-300:]}")


class Docker:
    def __init__(self, host: str, container: str, timeout: int):
        self.host, self.timeout = host, timeout
        self.path = f"/containers/{urllib.parse.quote(container, safe='')}"
        self.container = container

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        try:
            return docker_request(self.host, method, path, self.timeout, body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise BackupFailed(f"cannot reach Docker at {self.host}: {exc}") from None

    def inspect(self) -> dict | None:
        status, body = self.call("GET", self.path + "/json")
        if status == 404:
            return None
        if status != 200:
            raise BackupFailed(f"cannot read container {self.container}: {body.get('message')}")
        return body

    def pause(self, unpause: bool = False) -> None:
        status, body = self.call("POST", self.path + ("/unpause" if unpause else "/pause"))
        if status in (204, 304) or (unpause and status == 409
                                    and "not paused" in str(body.get("message"))):
            return
        raise BackupFailed(f"cannot {'un' if unpause else ''}pause {self.container}: "
                           f"{body.get('message')}")

    def unpause(self, attempts: int = 5) -> None:
        """A store left paused is down: try hard, then say so loudly."""
        for attempt in range(attempts):
            try:
                self.pause(unpause=True)
                return
            except BackupFailed:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)

    def run(self, command: str) -> None:
        """The image's dump command, in the container; its exit status decides."""
        status, body = self.call("POST", self.path + "/exec", {
            "Cmd": ["/bin/sh", "-c", command], "AttachStdout": False, "AttachStderr": False})
        if status != 201:
            raise BackupFailed(f"cannot run the dump command: {body.get('message')}")
        exec_id = body["Id"]
        status, body = self.call("POST", f"/exec/{exec_id}/start", {"Detach": True})
        if status not in (200, 204):
            raise BackupFailed(f"cannot start the dump command: {body.get('message')}")
        deadline = time.monotonic() + self.timeout
        while True:
            status, body = self.call("GET", f"/exec/{exec_id}/json")
            if status == 200 and not body.get("Running"):
                break
            if time.monotonic() > deadline:
                raise BackupFailed(f"the dump command ran over {self.timeout} s")
            time.sleep(0.1)
        if body.get("ExitCode") != 0:
            raise BackupFailed(f"the dump command failed (exit {body.get('ExitCode')})")


def snapshot(p: dict, staging: str) -> tuple[str, float, set[str]]:
    """Make what is archived consistent: how, for how long the store was paused, and
    which entries of the data dir were copied aside into `staging`."""
    docker = Docker(p["docker_host"], p["container"], p["timeout"])
    info = docker.inspect()
    state = (info or {}).get("State") or {}
    mark = os.path.join(p["data_dir"], PAUSE_MARK)
    if state.get("Paused") and os.path.exists(mark):
        docker.unpause()  # an earlier backup was killed while it held the store paused
        os.unlink(mark)
        info = docker.inspect()
        state = (info or {}).get("State") or {}
    if not state.get("Running"):
        return "at rest", 0.0, set()
    if state.get("Paused"):
        raise BackupFailed(f"{p['container']} is paused by someone else; not touched")
    dump = ((info.get("Config") or {}).get("Labels") or {}).get(p["dump_label"])
    if dump:
        docker.run(dump)
        return "dump", 0.0, set()
    entries = {e for e in p["pause_paths"] if os.path.exists(os.path.join(p["data_dir"], e))}
    os.makedirs(staging, mode=0o700)
    with open(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(f"{os.getpid()}\n")
    started = time.monotonic()
    try:
        docker.pause()
        for entry in sorted(entries):
            copy_within(os.path.join(p["data_dir"], entry), os.path.join(staging, entry),
                        started + p["max_pause_seconds"] - time.monotonic())
    finally:
        docker.unpause()
        os.unlink(mark)
    return "pause", round(time.monotonic() - started, 3), entries


def write_archive(data_dir: str, partial: str, staging: str, staged: set[str]) -> None:
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz",
                                                  compresslevel=6) as tar:
        tar.add(data_dir, arcname=TOP, recursive=False)
        for entry in sorted(os.listdir(data_dir)):
            if entry == PAUSE_MARK:
                continue
            source = os.path.join(staging if entry in staged else data_dir, entry)
            tar.add(source, arcname=f"{TOP}/{entry}")


def prune(archive: str, old: list[str]) -> list[str]:
    folder = os.path.dirname(archive)
    removed = []
    for path in old:
        path = os.path.abspath(path)
        if os.path.dirname(path) != folder or not path.endswith(".tar.gz") or path == archive:
            continue
        for name in (path, checksum_file(path)):
            if os.path.exists(name):
                os.unlink(name)
        removed.append(path)
    return removed


def mirror(folder: str, copy_to: str, removed: int) -> tuple[str, str]:
    """The archives' dir mirrored to the second location: (its path, error). It deletes
    there no more than retention just removed here (each archive and its checksum): a
    backup dir lost or emptied on this host never empties the second copy."""
    target = copy_to.rstrip("/") + "/" + os.path.basename(folder) + "/"
    command = ["rsync", "-a", "--delete", f"--max-delete={2 * removed}", "--mkpath",
               "--chmod=D700,F600", "--exclude=*.partial", "--exclude=*.staging",
               f"--exclude={PAUSE_MARK}", folder + "/", target]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", f"rsync to {copy_to}: {exc}"
    if done.returncode != 0:
        return "", f"rsync to {copy_to} failed: {done.stderr.strip()[-500:]}"
    return target, ""


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
            "container": {"type": "str", "required": True},
            "data_dir": {"type": "path", "required": True},
            "archive": {"type": "path", "required": True},
            "pause_paths": {"type": "list", "elements": "str", "default": ["db"]},
            "max_pause_seconds": {"type": "int", "default": 10},
            "dump_label": {"type": "str", "default": "ebuilder.backup.dump"},
            "remove": {"type": "list", "elements": "path", "default": []},
            "copy_to": {"type": "str", "default": ""},
            "timeout": {"type": "int", "default": 120},
        })
    p = module.params
    archive = os.path.abspath(p["archive"])
    if not archive.endswith(".tar.gz"):
        module.fail_json(msg=f"archive {archive} must end in .tar.gz")
    if os.path.exists(archive):
        module.fail_json(msg=f"archive {archive} exists already; not overwritten")
    if not os.path.isdir(p["data_dir"]):
        module.fail_json(msg=f"the store's data dir {p['data_dir']} does not exist")
    folder = os.path.dirname(archive)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    staging, partial = archive + ".staging", archive + ".partial"
    try:
        mode, paused, staged = snapshot(p, staging)
        write_archive(p["data_dir"], partial, staging, staged)
        digest = sha256_of(partial)
        os.replace(partial, archive)
        write_checksum(archive, digest)
        checked = verify(archive, digest)
    except (BackupFailed, ValueError, OSError, tarfile.TarError) as exc:
        for leftover in (partial, archive, checksum_file(archive)):
            if os.path.exists(leftover):
                os.unlink(leftover)
        module.fail_json(msg=f"backup of {p['container']} failed: {exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    removed = prune(archive, p["remove"])
    copy_path, copy_error = mirror(folder, p["copy_to"], len(removed)) if p["copy_to"] \
        else ("", "")
    module.exit_json(changed=True, archive=archive, sha256=digest,
                     size_bytes=checked["size_bytes"], mode=mode, paused_seconds=paused,
                     removed=removed, copy_path=copy_path + os.path.basename(archive)
                     if copy_path else "", copy_error=copy_error)


if __name__ == "__main__":
    main()
