#!/usr/bin/python
"""Which stores of a Docker host are already exactly as the role would leave them,
in one module call: converging an unchanged store through the role's tasks costs
~30 task runs of the controller (~2.5 s a store), so a fleet run skips those."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ebuilder_instance_in_step
short_description: Tell which stores' containers and data dirs need nothing
description:
  - For each store, reads its container from the local Docker API and its data dir,
    and says why the role would change something, or nothing when it would not.
  - Compares what the role sets, nothing else. Any doubt (an API error, a file it
    cannot read) is a reason, so the role runs for that store.
  - Secrets are compared here and never returned.
options:
  docker_host:
    description: The Docker API, C(unix://path) or C(tcp://host:port) (plain HTTP).
    type: str
    default: unix:///var/run/docker.sock
  stores:
    description: Each store as the role would make it (ebuilder_instance_expected).
    type: list
    elements: dict
    required: true
  timeout:
    description: Seconds for each request (the Docker API and the store's health page).
    type: int
    default: 10
author:
  - eBuilder Provisioner
"""

EXAMPLES = r"""
- name: Find the stores of this Docker host that need nothing.
  ebuilder_instance_in_step:
    stores: "{{ [ebuilder_instance_expected] }}"
  register: in_step
"""

RETURN = r"""
stores:
  description: Each store's name to '' (in step) or the first difference found.
  returned: always
  type: dict
  sample: {"janes-shop": "", "joes-shop": "container exited"}
"""

import http.client  # noqa: E402 (Ansible wants the documentation first)
import json  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import urllib.parse  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.ebuilder_docker import docker_request  # noqa: E402

MIB = 1024 * 1024
NANO = 1_000_000_000
# As library/ebuilder_instance_limits.py writes "no memory limit" (the kernel's).
NO_MEMORY_LIMIT = 0x7FFFFFFFFFFFF000


def _get(docker_host: str, path: str, timeout: int) -> tuple[int, dict]:
    status, body = docker_request(docker_host, "GET", path, timeout)
    return status, body if status == 200 else {}


def _file_is(path: str, mode: int, content: str | None = None) -> bool:
    try:
        info = os.stat(path)
        if stat.S_IMODE(info.st_mode) != mode:
            return False
        if content is None:
            return True
        with open(path, encoding="utf-8") as handle:
            return handle.read() == content
    except (OSError, UnicodeDecodeError):
        return False


def _secret(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _health(address: str, port: int, path: str, timeout: int) -> int:
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return -1
    finally:
        connection.close()


def limits_differ(host: dict, store: dict, ncpu: int, swap_limit: bool) -> bool:
    """Whether library/ebuilder_instance_limits.py would update the container's limits:
    the same reading of its HostConfig (0, the kernel's "unlimited" and all of the host's
    CPUs are no limit; memory without swap on top). tests/test_limits_module.py holds
    the two to the same answers."""
    memory = max(int(store.get("memory_mb") or 0), 0) * MIB
    cpus = float(store.get("cpus") or 0)
    nano = round(cpus * NANO) if 0 < cpus < ncpu else 0
    have_memory, have_nano = host.get("Memory") or 0, host.get("NanoCpus") or 0
    return ((have_memory if 0 < have_memory < NO_MEMORY_LIMIT else 0) != memory
            or bool(memory and swap_limit and host.get("MemorySwap") != memory)
            or (have_nano if 0 < have_nano < ncpu * NANO else 0) != nano
            or max(host.get("PidsLimit") or 0, 0) != max(int(store.get("pids_limit") or 0), 0))


def difference(store: dict, docker_host: str, timeout: int, images: dict,
               engine: dict | None = None) -> str:
    """'' when the role would change nothing for `store`, else the first reason.
    `images` and `engine` (GET /info) are read once for all the stores of a host."""
    data_dir = store["dir"]
    for sub in ("db", "media", "logs"):
        if not os.path.isdir(os.path.join(data_dir, sub)) or \
                stat.S_IMODE(os.stat(os.path.join(data_dir, sub)).st_mode) != 0o750:
            return f"data dir {sub} missing or not 0750"
    if not _file_is(os.path.join(data_dir, ".installation"), 0o600, store["installation"] + "\n"):
        return "data dir not marked as this installation's"
    if not _file_is(os.path.join(data_dir, "secret_key"), 0o600):
        return "no secret key"
    # As container.yml records it (to_json of the module's disk_mb).
    manage_limits = str(store.get("manage_limits", True)).lower() not in ("false", "0")
    disk = json.dumps({"disk_mb": max(int(store.get("disk_mb") or 0), 0)}) + "\n"
    if manage_limits and not _file_is(os.path.join(data_dir, ".limits"), 0o600, disk):
        return "disk limit not recorded as the plan's"
    status, info = _get(docker_host, f"/containers/{store['container']}/json", timeout)
    if status != 200:
        return "container missing" if status == 404 else f"container unreadable (HTTP {status})"
    config, host = info.get("Config") or {}, info.get("HostConfig") or {}
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    wanted_env = {**store["env"], "SECRET_KEY": _secret(os.path.join(data_dir, "secret_key"))}
    if any(env.get(name) != value for name, value in wanted_env.items()):
        return "environment differs"
    labels = config.get("Labels") or {}
    if any(labels.get(name) != value for name, value in store["labels"].items()):
        return "labels differ"
    if store["image"] not in images:
        images[store["image"]] = _get(docker_host, "/images/"
                                      + urllib.parse.quote(store["image"], safe="") + "/json",
                                      timeout)[1].get("Id")
    if not images[store["image"]] or info.get("Image") != images[store["image"]]:
        return "image differs"
    if not (info.get("State") or {}).get("Running"):
        return f"container {(info.get('State') or {}).get('Status', 'not running')}"
    if (host.get("RestartPolicy") or {}).get("Name") != "unless-stopped":
        return "restart policy differs"
    engine = {} if engine is None else engine
    if "NCPU" not in engine:
        status, answer = _get(docker_host, "/info", timeout)
        if status != 200:
            return f"engine info unreadable (HTTP {status})"
        engine.update(answer)
    if manage_limits and limits_differ(host, store, int(engine.get("NCPU") or 1),
                                       bool(engine.get("SwapLimit", True))):
        return "limits differ"
    address = store.get("address") or "127.0.0.1"
    if (host.get("PortBindings") or {}) != {"8000/tcp": [{"HostIp": address,
                                                         "HostPort": str(store["port"])}]}:
        return "published port differs"
    # Read-write binds, as community.docker writes them ("src:dst:rw") or not.
    binds = sorted(bind.removesuffix(":rw") for bind in host.get("Binds") or [])
    if binds != sorted(f"{data_dir}/{sub}:/app/{sub}" for sub in ("db", "media", "logs")):
        return "volumes differ"
    if store["network"] not in ((info.get("NetworkSettings") or {}).get("Networks") or {}):
        return "not on the store network"
    if _health(address, int(store["port"]), store["health_path"], timeout) != 200:
        return "health check does not answer 200"
    return ""


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
            "stores": {"type": "list", "elements": "dict", "required": True},
            "timeout": {"type": "int", "default": 10},
        },
        supports_check_mode=True)
    params = module.params
    images: dict = {}
    engine: dict = {}

    def judge(store: dict) -> str:
        try:
            return difference(store, params["docker_host"], params["timeout"], images, engine)
        except Exception as exc:  # any doubt: the role runs for this store
            return f"not checked: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        verdicts = list(pool.map(judge, params["stores"]))
    module.exit_json(changed=False,
                     stores={s["name"]: v for s, v in zip(params["stores"], verdicts, strict=True)})


if __name__ == "__main__":
    main()
