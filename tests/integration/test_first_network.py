"""The first stores of a Docker host, in one batch, share one store network: the
engine accepts several networks of one name, so parallel creates would leave
duplicates (and then "network is ambiguous" for every later store)."""

from __future__ import annotations

import dataclasses
import secrets
import subprocess

from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars
from provisioner.testing.stack import free_port


def networks_named(name: str) -> list[str]:
    return subprocess.run(["docker", "network", "ls", "-q", "--filter", f"name=^{name}$"],
                          check=True, capture_output=True, text=True).stdout.split()


def test_a_batch_of_five_first_stores_makes_exactly_one_network(service):
    network = f"ebuilder_first_{secrets.token_hex(4)}"
    # Ansible's own linear strategy (a sysadmin's plain run), where the stores' module
    # calls really run in parallel forks, one per store: the old role left 4 networks here.
    config = dataclasses.replace(service.config, container_network=network, ansible_mitogen=False,
                                 ansible_forks=5)
    stores = [StoreVars(name=f"first-{n}", instance_id=f"first-{n}", site_name=f"First {n}",
                        admin_email=f"first{n}@example.com", port=free_port(),
                        docker_host="localhost") for n in range(5)]
    assert networks_named(network) == []
    try:
        result = operations.run(config, Operation.PROVISION, stores,
                                secrets={s.name: {"admin_password": "first-boot"} for s in stores})
        assert all(outcome.ok for outcome in result.hosts.values()), result.hosts
        made = networks_named(network)
        assert len(made) == 1, f"{len(made)} networks named {network}"
        attached = subprocess.run(
            ["docker", "network", "inspect", network, "--format",
             "{{range .Containers}}{{.Name}} {{end}}"],
            check=True, capture_output=True, text=True).stdout.split()
        assert sorted(attached) == [f"ebuilder_first-{n}" for n in range(5)]
    finally:
        subprocess.run(["docker", "rm", "-f", *(f"ebuilder_{s.name}" for s in stores)],
                       capture_output=True)
        for ident in networks_named(network):
            subprocess.run(["docker", "network", "rm", ident], capture_output=True)
