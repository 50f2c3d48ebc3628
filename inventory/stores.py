#!/usr/bin/env python3
"""Ansible inventory of the provisioner's stores, read from its database.

    ansible-inventory -i inventory --list
    ansible-playbook -i inventory playbooks/restart.yml --limit janes-shop

Each live store is a host in group `stores` (and `docker_host_<name>`, and
`state_<state>`), connecting like the Docker host it lives on (hosts.yml), with its
provisioner_store record as vars; the service's settings are the vars of group
`all`. How to reach a Docker host is the vars of its group `docker_host_<name>` (for
ad-hoc commands): playbooks derive the same from the store's record
(playbooks/group_vars/stores.yml, which beats inventory group vars), so a play can
point a store at another host (move.yml). Never a secret, and every value marked
unsafe: a store's name is data, never a template. Runs with the provisioner's Python
and configuration (PROVISIONER_ENV_FILE, else `.env` here, the project's `.env` or
/etc/ebuilder-provisioner.env; the environment overrides). Started by another Python
(an `ansible-inventory` outside the venv), it runs itself again with the project's
`.venv`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

CONNECTION_VARS = ("ansible_connection", "ansible_host", "ansible_port", "ansible_user",
                   "ansible_python_interpreter", "ansible_ssh_private_key_file",
                   "ansible_ssh_common_args", "ansible_ssh_extra_args",
                   "ansible_host_key_checking", "ebuilder_instance_docker_host")


def docker_host_vars(path: Path) -> dict[str, dict]:
    data = yaml.safe_load(path.read_text()) or {}
    group = data.get("docker_hosts") or {}
    shared = group.get("vars") or {}
    return {name: {k: v for k, v in {**shared, **(host or {})}.items() if k in CONNECTION_VARS}
            for name, host in (group.get("hosts") or {}).items()}


def inventory() -> dict:
    try:
        from pony.orm import db_session

        from provisioner import models
        from provisioner.ansible.runner import settings_vars
        from provisioner.ansible.store_vars import with_target
        from provisioner.ansible.untrusted import inventory_json_value
        from provisioner.config import ConfigError, env_file_path, load_config
    except ImportError:
        venv = Path(__file__).resolve().parents[1] / ".venv"
        python = venv / "bin" / "python"
        if python.is_file() and Path(sys.prefix).resolve() != venv.resolve():
            os.execv(python, [str(python), __file__, *sys.argv[1:]])  # noqa: S606 (no shell)
        sys.exit("inventory/stores.py needs the provisioner's Python: source .venv/bin/activate")
    try:
        config = models.open_database(load_config())
    except ConfigError as exc:
        sys.exit(f"provisioner settings ({env_file_path()} and the environment): {exc}")
    hosts = docker_host_vars(Path(__file__).with_name("hosts.yml"))
    result: dict = {"all": {"vars": inventory_json_value(settings_vars(config))},
                    "stores": {"hosts": []}, "_meta": {"hostvars": {}}}
    with db_session:
        for instance in models.Instance.select(lambda i: i.live).order_by(models.Instance.id):
            record = with_target(config, instance).as_dict()
            name = record["name"]
            result["stores"]["hosts"].append(name)
            for group in (f"docker_host_{instance.docker_host}", f"state_{record['state']}"):
                result.setdefault(group.replace("-", "_"), {"hosts": []})["hosts"].append(name)
            engine = f"docker_host_{instance.docker_host}".replace("-", "_")
            if hosts.get(instance.docker_host):
                result[engine]["vars"] = hosts[instance.docker_host]
            result["_meta"]["hostvars"][name] = {
                "provisioner_store": inventory_json_value(record)}
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--host":
        print("{}")
    else:
        print(json.dumps(inventory(), indent=2))
