#!/usr/bin/python
"""A store's container limits (those of its plan) changed in place, never below what
the store uses: a downgrade it does not fit is refused before anything changes."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ebuilder_instance_limits
short_description: Give a store's container its plan's limits in place, unless it uses more
description:
  - Reads the container's memory, CPU and process limits from the local Docker API and,
    when they differ from the plan's, updates them in place (the container is not
    recreated). Memory is limited without swap on top (MemorySwap = Memory).
  - Before changing anything, compares what the store uses with each lowered limit (its
    memory without the inactive page cache, as C(docker stats) counts it; its processes;
    its data dir's size against O(disk_mb)). When it uses more, what happens is
    O(excess)'s: C(refuse) fails with a message starting C(plan refused:) and changes
    nothing; C(keep) applies the limits the store fits, leaves the others as they were
    and succeeds, saying why in RV(kept) (a store run with the plan it already has,
    whose limits were never applied: an upgrade of the provisioner, a plan's limits
    edited); C(force) applies them all.
  - Docker cannot enforce O(disk_mb) on bind-mounted data dirs. The disk limit last applied
    is read from C(<data_dir>/.limits) (the role writes it), so the size is only checked when
    O(disk_mb) is lowered; a store that outgrew its disk is not refused every run.
  - Docker's update API takes 0 as "unchanged" and refuses -1 for memory and CPUs, so no
    limit is written as the kernel's "unlimited" for memory, and as all of the host's CPUs
    for CPUs (O(cpus) of at least the host's CPU count is no limit).
  - A memory limit below what the store uses (O(excess=force), or O(state=stopped)) is applied
    by stopping the container, updating it and starting it again unless O(state=stopped);
    the kernel cannot shrink it in place (cgroup v1 refuses, v2 kills whichever process).
  - A missing container is left alone (its creation sets the limits); the limits it is to
    get are returned.
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
    description: The store's data dir, measured against O(disk_mb).
    type: path
    required: true
  memory_mb:
    description: Memory limit in MiB; 0 is none.
    type: int
    default: 0
  cpus:
    description: CPU limit in CPUs; 0 is none.
    type: float
    default: 0
  pids_limit:
    description: Most processes (and threads); 0 is none.
    type: int
    default: 0
  disk_mb:
    description: Largest data dir in MiB; 0 is none. Only checked when lowered.
    type: int
    default: 0
  excess:
    description: What to do when the store uses more than a lowered limit.
    type: str
    choices: [refuse, keep, force]
    default: refuse
  state:
    description:
      - What the role makes of the container next. A store to be stopped will use no memory
        nor process, so only its disk is held against the plan.
    type: str
    choices: [started, stopped]
    default: started
  timeout:
    description: Seconds for each Docker API request.
    type: int
    default: 30
notes:
  - Supports check mode (reports what it would change, and a refusal, changes nothing).
author:
  - eBuilder Provisioner
"""

EXAMPLES = r"""
- name: Give the store's container its plan's limits.
  ebuilder_instance_limits:
    container: ebuilder_janes-shop
    data_dir: /srv/ebuilder/customers/42
    memory_mb: 512
    cpus: 0.5
    pids_limit: 256
    disk_mb: 5120
"""

RETURN = r"""
limits:
  description: The limits the container has now (or gets when created); 0 is none.
  returned: always
  type: dict
  sample: {"memory_mb": 512, "cpus": 0.5, "pids_limit": 256, "disk_mb": 5120}
previous:
  description: The limits the container had; absent when it does not exist.
  returned: when the container exists
  type: dict
  sample: {"memory_mb": 1024, "cpus": 1.0, "pids_limit": 512, "disk_mb": 10240}
usage:
  description: What the store used, in MiB and processes, for the limits checked.
  returned: when a limit changed
  type: dict
  sample: {"memory_mb": 31.4, "pids": 5, "disk_mb": 12.1}
forced:
  description: The reasons a refusal was overridden by O(excess=force).
  returned: always
  type: list
  elements: str
kept:
  description: With O(excess=keep), why some limits were left as they were; else empty.
  returned: always
  type: list
  elements: str
stopped_for_update:
  description: >-
    Whether the container was stopped to take a memory limit below what it used (the
    kernel cannot take that back in place), and started again unless O(state=stopped).
  returned: when a limit changed
  type: bool
"""

import http.client  # noqa: E402 (Ansible wants the documentation first)
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import urllib.parse  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.ebuilder_docker import docker_request  # noqa: E402

MIB = 1024 * 1024
NANO = 1_000_000_000
# The kernel's "no memory limit" (PAGE_COUNTER_MAX pages, as cgroup v1 reads it back):
# the update API takes 0 as "unchanged" and refuses -1 (below its 6 MB minimum).
NO_MEMORY_LIMIT = 0x7FFFFFFFFFFFF000
# Where the role records the disk limit last applied: Docker has no place for it.
LIMITS_FILE = ".limits"
REFUSED = "plan refused: "
LIMITS = ("memory_mb", "cpus", "pids_limit", "disk_mb")


# Decisions: plain functions of what was read (tests/test_limits_module.py).

def wanted_limits(memory_mb: int, cpus: float, pids_limit: int, disk_mb: int,
                  ncpu: int) -> dict:
    """The plan's limits as the container can have them (0: none). Docker refuses more
    CPUs than the host has; a limit of all of them is none."""
    return {"memory_mb": max(memory_mb, 0), "cpus": float(cpus) if 0 < cpus < ncpu else 0.0,
            "pids_limit": max(pids_limit, 0), "disk_mb": max(disk_mb, 0)}


def current_limits(host_config: dict, ncpu: int, disk_mb: int) -> dict:
    """The container's limits in plan units (0: none), with the disk limit last recorded."""
    memory = host_config.get("Memory") or 0
    nano = host_config.get("NanoCpus") or 0
    pids = host_config.get("PidsLimit") or 0
    return {"memory_mb": (memory // MIB if memory % MIB == 0 else memory / MIB)
            if 0 < memory < NO_MEMORY_LIMIT else 0,
            "cpus": nano / NANO if 0 < nano < ncpu * NANO else 0.0,
            "pids_limit": max(pids, 0), "disk_mb": max(disk_mb, 0)}


def update_body(host_config: dict, wanted: dict, ncpu: int, swap_limit: bool) -> dict:
    """The body of POST /containers/{id}/update giving the container `wanted`; {} when
    it has them. Memory goes with MemorySwap = Memory: no swap on top of the limit."""
    current = current_limits(host_config, ncpu, 0)
    body: dict = {}
    memory = wanted["memory_mb"] * MIB
    # Where the kernel has no swap accounting Docker keeps MemorySwap -1 whatever it is sent.
    swap_differs = memory and swap_limit and host_config.get("MemorySwap") != memory
    if current["memory_mb"] * MIB != memory or swap_differs:
        body["Memory"] = body["MemorySwap"] = memory or NO_MEMORY_LIMIT
    nano = round(wanted["cpus"] * NANO)
    if round(current["cpus"] * NANO) != nano:
        body["NanoCpus"] = nano or ncpu * NANO
    if current["pids_limit"] != wanted["pids_limit"]:
        body["PidsLimit"] = wanted["pids_limit"] or -1
    return body


def lowered(current: dict, wanted: dict) -> list[str]:
    """The limits `wanted` lowers; a limit where there was none is lowered."""
    return [name for name in LIMITS
            if wanted[name] and (not current[name] or wanted[name] < current[name])]


def _mib(value: float) -> str:
    return f"{math.ceil(value * 10) / 10:g}"


def unfit(wanted: dict, usage: dict, lowered_limits: list[str]) -> list[str]:
    """The lowered limits the store does not fit (CPU is only ever slower: never)."""
    used = {"memory_mb": usage.get("memory_mb", 0), "pids_limit": usage.get("pids", 0),
            "disk_mb": usage.get("disk_mb", 0)}
    return [name for name in ("memory_mb", "pids_limit", "disk_mb")
            if name in lowered_limits and used[name] > wanted[name]]


def fitting(current: dict, wanted: dict, unfit_limits: list[str]) -> dict:
    """`wanted`, but the limits the store does not fit as they were (excess=keep)."""
    return {**wanted, **{name: current[name] for name in unfit_limits}}


def refusals(container: str, wanted: dict, usage: dict, lowered_limits: list[str]) -> list[str]:
    """Why the store does not fit the lowered limits (CPU is only ever slower: never)."""
    reasons = []
    if "memory_mb" in lowered_limits and usage.get("memory_mb", 0) > wanted["memory_mb"]:
        reasons.append(f"{container} uses {_mib(usage['memory_mb'])} MiB of memory, "
                       f"more than the plan's {wanted['memory_mb']} MiB")
    if "pids_limit" in lowered_limits and usage.get("pids", 0) > wanted["pids_limit"]:
        reasons.append(f"{container} runs {usage['pids']} processes, "
                       f"more than the plan's {wanted['pids_limit']}")
    if "disk_mb" in lowered_limits and usage.get("disk_mb", 0) > wanted["disk_mb"]:
        reasons.append(f"{container}'s data dir holds {_mib(usage['disk_mb'])} MiB, "
                       f"more than the plan's {wanted['disk_mb']} MiB of disk")
    return reasons


def refusal_message(reasons: list[str]) -> str:
    return REFUSED + "; ".join(reasons) + "; limits left as they were"


def restart_needed(body: dict, wanted: dict, usage: dict) -> bool:
    """A memory limit below what the store uses (forced, or a store being stopped): the
    kernel cannot take that back in place (cgroup v1 refuses the limit, v2 kills whichever
    process), so the container is stopped for the update."""
    return "Memory" in body and 0 < wanted["memory_mb"] < usage.get("memory_mb", 0)


def memory_in_use(memory_stats: dict) -> int:
    """Bytes in use without the inactive page cache, as the docker CLI counts them."""
    usage = memory_stats.get("usage") or 0
    stats = memory_stats.get("stats") or {}
    if "total_inactive_file" in stats and stats["total_inactive_file"] < usage:  # cgroup v1
        return usage - stats["total_inactive_file"]
    if stats.get("inactive_file", usage) < usage:  # cgroup v2
        return usage - stats["inactive_file"]
    return usage


# What is read: the Docker API and the data dir.

def recorded_disk_mb(data_dir: str) -> int:
    """The disk limit the role last recorded; none (0) when it never did."""
    try:
        with open(os.path.join(data_dir, LIMITS_FILE), encoding="utf-8") as handle:
            return int(json.load(handle).get("disk_mb") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def dir_size(path: str) -> int:
    """Bytes the dir takes on disk (like du: allocated blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files, *([] if root != path else [""])]:
            try:
                info = os.lstat(os.path.join(root, name) if name else root)
            except OSError:
                continue
            if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
            "container": {"type": "str", "required": True},
            "data_dir": {"type": "path", "required": True},
            "memory_mb": {"type": "int", "default": 0},
            "cpus": {"type": "float", "default": 0},
            "pids_limit": {"type": "int", "default": 0},
            "disk_mb": {"type": "int", "default": 0},
            "excess": {"type": "str", "default": "refuse",
                       "choices": ["refuse", "keep", "force"]},
            "state": {"type": "str", "default": "started", "choices": ["started", "stopped"]},
            "timeout": {"type": "int", "default": 30},
        },
        supports_check_mode=True)
    p = module.params
    name = p["container"]

    def docker(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        try:
            return docker_request(p["docker_host"], method, path, p["timeout"], body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            module.fail_json(msg=f"cannot reach Docker at {p['docker_host']}: {exc}")

    status, info = docker("GET", "/info")
    if status != 200:
        module.fail_json(msg=f"cannot read Docker's info (HTTP {status}): {info.get('message')}")
    ncpu = int(info.get("NCPU") or 1)
    wanted = wanted_limits(p["memory_mb"], p["cpus"], p["pids_limit"], p["disk_mb"], ncpu)
    status, container = docker("GET", f"/containers/{urllib.parse.quote(name, safe='')}/json")
    if status == 404:
        module.exit_json(changed=False, limits=wanted, forced=[], kept=[])
    if status != 200:
        module.fail_json(msg=f"cannot read container {name} (HTTP {status}): "
                             f"{container.get('message')}")
    host_config = container.get("HostConfig") or {}
    current = current_limits(host_config, ncpu, recorded_disk_mb(p["data_dir"]))
    body = update_body(host_config, wanted, ncpu, bool(info.get("SwapLimit", True)))
    down = lowered(current, wanted)
    if not body and not down:
        module.exit_json(changed=False, limits=wanted, previous=current, forced=[], kept=[])

    usage: dict = {}
    if (container.get("State") or {}).get("Running"):
        status, stats = docker("GET", f"/containers/{container['Id']}/stats"
                                      "?stream=false&one-shot=true")
        if status != 200:
            module.fail_json(msg=f"cannot read what {name} uses (HTTP {status}): "
                                 f"{stats.get('message')}")
        usage["memory_mb"] = memory_in_use(stats.get("memory_stats") or {}) / MIB
        usage["pids"] = int((stats.get("pids_stats") or {}).get("current") or 0)
    if "disk_mb" in down:
        usage["disk_mb"] = dir_size(p["data_dir"]) / MIB
    shown = {key: round(value, 1) for key, value in usage.items()}
    # A store about to be stopped will use no memory nor process: only its disk counts.
    held = usage if p["state"] == "started" else {"disk_mb": usage.get("disk_mb", 0)}
    reasons = refusals(name, wanted, held, down)
    if reasons and p["excess"] == "refuse":
        module.fail_json(msg=refusal_message(reasons), limits=current, usage=shown)
    kept: list[str] = []
    if reasons and p["excess"] == "keep":
        # The limits it fits are applied; those it does not stay as they were.
        kept = reasons
        module.warn(refusal_message(reasons).replace(REFUSED, "plan's limits kept: ", 1))
        wanted = fitting(current, wanted, unfit(wanted, held, down))
        body = update_body(host_config, wanted, ncpu, bool(info.get("SwapLimit", True)))
        reasons = []
    stop_first = restart_needed(body, wanted, usage)
    if body and not module.check_mode:
        steps = [("POST", f"/containers/{container['Id']}/stop?t=30", None)] if stop_first else []
        steps.append(("POST", f"/containers/{container['Id']}/update", body))
        if stop_first and p["state"] == "started":
            steps.append(("POST", f"/containers/{container['Id']}/start", None))
        for method, path, data in steps:
            status, answer = docker(method, path, data)
            if status not in (200, 204, 304):
                module.fail_json(msg=f"cannot update the limits of {name} (HTTP {status}): "
                                     f"{answer.get('message')}", limits=current, usage=shown)
    module.exit_json(changed=bool(body), limits=wanted, previous=current, usage=shown,
                     forced=reasons, kept=kept, stopped_for_update=stop_first)


if __name__ == "__main__":
    main()
