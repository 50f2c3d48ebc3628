"""Live facts from Docker, asked of the engine a store lives on: the one place the
service itself talks to Docker (playbooks do everything that changes it)."""

from __future__ import annotations

import json
import shlex
import subprocess
import urllib.error
import urllib.request

from provisioner import docker_hosts
from provisioner.config import Config
from provisioner.models import Instance, utcnow


class DockerUnavailable(RuntimeError):
    """The engine did not answer, or the container does not exist."""


def docker(host: docker_hosts.DockerHost, *args: str, timeout: float = 30) -> str:
    """`docker -H <its engine> ...` on the host (over ssh unless it is this machine: its
    engine's URL is local to it), its output; DockerUnavailable with docker's own
    message."""
    command = ["docker", "-H", host.url, *args]
    if host.ssh:
        command = [*host.ssh, shlex.join(command)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DockerUnavailable(f"docker {args[0]} timed out after {timeout:.0f} s") from None
    if result.returncode != 0:
        raise DockerUnavailable(result.stderr.strip() or f"docker {args[0]} failed")
    return result.stdout


def _of_store(config: Config, instance: Instance, *args: str) -> str:
    return docker(docker_hosts.host_of(config, instance.docker_host), *args)



def is_ours(config: Config, instance: Instance, labels: dict) -> bool:
    """The role's rule: this installation's container for this store (or one made before
    installation ids, labelled managed with this store's id)."""
    if labels.get("ebuilder.instance_id") != str(instance.id):
        return False
    if "ebuilder.installation" not in labels:
        return labels.get("ebuilder.managed") == "true"
    return labels["ebuilder.installation"] == config.installation_id


def live_health(config: Config, instance: Instance) -> dict:
    """Container state from Docker plus an HTTP /health/ on the store's own port, on its
    own Docker host's address."""
    try:
        found = json.loads(_of_store(
            config, instance, "inspect", "--format",
            '{"state": {{json .State}}, "labels": {{json .Config.Labels}}}',
            instance.container_name))
        state, labels = found["state"], found["labels"] or {}
        container = {"exists": True, "running": state.get("Running", False),
                     "status": state.get("Status"), "started_at": state.get("StartedAt"),
                     "restarts": state.get("RestartCount"),
                     "ours": is_ours(config, instance, labels)}
        if not container["ours"]:
            container.update(running=False, status="not ours")
    except DockerUnavailable:
        container = {"exists": False, "running": False, "status": "missing"}
    http = {"ok": False, "status": None}
    try:
        address = docker_hosts.host_of(config, instance.docker_host).address
        with urllib.request.urlopen(  # noqa: S310 (http URL of a private address)
                f"http://{address}:{instance.port}/health/", timeout=5) as response:
            http = {"ok": response.status == 200, "status": response.status}
    except urllib.error.HTTPError as exc:
        http = {"ok": False, "status": exc.code}
    except OSError as exc:
        http = {"ok": False, "status": None, "error": str(exc)}
    return {"id": instance.id, "subdomain": instance.subdomain, "container": container,
            "http": http, "healthy": container["running"] and http["ok"],
            "checked_at": utcnow().isoformat(timespec="seconds") + "Z"}


def live_stats(config: Config, instance: Instance) -> dict:
    try:
        raw = json.loads(_of_store(config, instance, "stats", "--no-stream", "--format",
                                   "{{json .}}", instance.container_name))
    except DockerUnavailable as exc:
        return {"id": instance.id, "available": False, "error": str(exc)}
    return {"id": instance.id, "available": True, "cpu_percent": raw.get("CPUPerc"),
            "memory": raw.get("MemUsage"), "memory_percent": raw.get("MemPerc"),
            "network_io": raw.get("NetIO"), "block_io": raw.get("BlockIO"),
            "pids": raw.get("PIDs")}


def containers_on(config: Config, host: docker_hosts.DockerHost) -> dict[str, dict]:
    """This installation's containers (by label) on one Docker host: name -> {state,
    image, labels}."""
    output = docker(host, "ps", "-a", "--filter",
                    f"label=ebuilder.installation={config.installation_id}",
                    "--format", "{{json .}}", timeout=60)
    found = {}
    for line in output.splitlines():
        row = json.loads(line)
        labels = dict(part.split("=", 1) for part in row.get("Labels", "").split(",")
                      if "=" in part)
        found[row["Names"]] = {"state": row.get("State"), "image": row.get("Image"),
                               "labels": labels}
    return found


def remove_container(host: docker_hosts.DockerHost, name: str) -> None:
    docker(host, "rm", name, timeout=60)
