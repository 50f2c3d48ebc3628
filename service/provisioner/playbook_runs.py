"""The one place that calls ansible-runner.

Each run gets its own private data dir under the data dir; its artifacts
(stdout, per-task events, status, rc) are kept as the provisioning log. The
variables, some secret, go in `env/extravars` (mode 0600) so they never appear
on a command line or in the artifacts, and that file is deleted after the run.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner

from provisioner.config import Config

EventSink = Callable[[dict], None]


@dataclass
class HostOutcome:
    ok: bool
    changed: int = 0
    error: str | None = None


@dataclass
class RunResult:
    ident: str
    playbook: str
    status: str
    rc: int | None
    artifact_dir: Path
    hosts: dict[str, HostOutcome] = field(default_factory=dict)


def settings_vars(config: Config) -> dict:
    """Role inputs that come from the service's configuration."""
    return {
        # Not ebuilder_instance_image: extra vars would beat each store's own image.
        "provisioner_default_image": config.ebuilder_image,
        "ebuilder_instance_health_retries": config.health_wait_seconds,
        "ebuilder_instance_data_root": str(config.customer_data_root),
        "ebuilder_instance_network": config.container_network,
        "ebuilder_instance_base_domain": config.base_domain,
        "nginx_site_base_domain": config.base_domain,
        "nginx_site_config_dir": str(config.nginx_config_dir),
        "nginx_site_bin": config.nginx_bin,
        "nginx_site_main_conf": config.nginx_main_conf,
        "nginx_site_http_listen": config.nginx_http_listen,
        "nginx_site_https_listen": config.nginx_https_listen,
        "nginx_site_ssl_certificate": config.wildcard_ssl_cert,
        "nginx_site_ssl_certificate_key": config.wildcard_ssl_key,
    }


def _error_of(event: dict) -> str:
    res = (event.get("event_data") or {}).get("res") or {}
    if res.get("censored"):
        return res["censored"]
    message = res.get("msg") or res.get("stderr") or res.get("reason") or "failed"
    return str(message)[:2000]


def new_ident(playbook: str) -> str:
    return f"{playbook.removesuffix('.yml')}-{uuid.uuid4().hex[:12]}"


def artifact_dir(config: Config, ident: str) -> Path:
    return config.ansible_runs_dir / ident / "artifacts" / ident


def _stdout_tail(runner, lines: int = 5) -> str:
    try:
        text = runner.stdout.read()
    except (OSError, AttributeError):
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def run_playbook(config: Config, playbook: str, stores: list[dict], secrets: dict | None = None,
                 on_event: EventSink | None = None, limit: str | None = None,
                 ident: str | None = None, extra_vars: dict | None = None) -> RunResult:
    """Run playbooks/<playbook> for the given stores in one ansible run."""
    ident = ident or new_ident(playbook)
    private_dir = config.ansible_runs_dir / ident
    env_dir = private_dir / "env"
    env_dir.mkdir(parents=True, mode=0o700)
    extravars = {**settings_vars(config), "provisioner_stores": stores,
                 "provisioner_secrets": secrets or {}, **(extra_vars or {})}
    extravars_file = env_dir / "extravars"
    fd = os.open(extravars_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(extravars, handle)
    failures: dict[str, str] = {}

    def event_handler(event: dict) -> bool:
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data") or {}
            if not data.get("ignore_errors"):
                # The last failure is the one that stopped the host (rescues come first).
                failures[data.get("host", "?")] = _error_of(event)
        if on_event is not None:
            on_event(event)
        return True

    try:
        runner = ansible_runner.run(
            private_data_dir=str(private_dir),
            ident=ident,
            playbook=str(config.playbooks_dir / playbook),
            # The Docker hosts only: the stores of this run come as provisioner_stores.
            inventory=str(config.inventory_file),
            limit=limit,
            forks=config.ansible_forks,
            envvars={
                "ANSIBLE_CONFIG": str(config.project_dir / "ansible.cfg"),
                "ANSIBLE_ROLES_PATH": str(config.project_dir / "roles"),
                "ANSIBLE_NOCOLOR": "1",
                # ansible-playbook lives beside the Python running us, venv or not.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            },
            event_handler=event_handler,
            quiet=True,
        )
    finally:
        extravars_file.unlink(missing_ok=True)
    stats = runner.stats or {}
    hosts: dict[str, HostOutcome] = {}
    for store in stores:
        name = store["name"]
        failed = name in failures or name in (stats.get("failures") or {}) or \
            name in (stats.get("dark") or {})
        seen = any(name in (stats.get(key) or {}) for key in ("ok", "failures", "dark", "skipped"))
        error = failures.get(name)
        if not seen and not failed:
            error = (f"ansible did not reach {name} (run {runner.status}, rc {runner.rc}): "
                     f"{_stdout_tail(runner)}")
        hosts[name] = HostOutcome(ok=seen and not failed,
                                  changed=(stats.get("changed") or {}).get(name, 0), error=error)
    return RunResult(ident=ident, playbook=playbook, status=runner.status, rc=runner.rc,
                     artifact_dir=Path(runner.config.artifact_dir), hosts=hosts)
