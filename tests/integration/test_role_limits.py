"""A store's plan limits on real containers, through the role as the service runs it
(Operation.PROVISION): set when the container is made, changed in place afterwards,
and a downgrade the store does not fit refused with nothing changed, unless forced."""

from __future__ import annotations

import json
import re
import secrets

from provisioner.ansible import operations
from provisioner.ansible.operations import Operation
from provisioner.ansible.store_vars import StoreVars
from provisioner.testing.stack import free_port
from tests.integration.conftest import docker, https_request, inspect, poll

MIB = 1024 * 1024
# How the role writes "no memory limit": Docker's update API cannot unset one.
NO_MEMORY_LIMIT = 0x7FFFFFFFFFFFF000
UNITS = {"B": 1, "KiB": 1024, "MiB": MIB, "GiB": 1024 * MIB}


def store(name: str, **limits) -> StoreVars:
    return StoreVars(name=name, instance_id=f"limits-{secrets.token_hex(3)}", site_name=name,
                     admin_email=f"{name}@example.com", port=free_port(),
                     docker_host="localhost", **limits)


def provision(service, vars_: StoreVars, first: bool = False,
              operation: Operation = Operation.PROVISION):
    """One run of the store (the first with its first-boot password)."""
    result = operations.run(service.config, operation, [vars_],
                            secrets={vars_.name: {"admin_password": "first-boot"}} if first
                            else None)
    return result.hosts[vars_.name]


def limits_of(name: str) -> dict:
    host = inspect(f"ebuilder_{name}")["HostConfig"]
    return {key: host[key] for key in ("Memory", "MemorySwap", "NanoCpus", "PidsLimit")}


def memory_stats(name: str) -> tuple[float, float]:
    """Bytes in use and the limit the kernel enforces now, as docker stats shows them."""
    shown = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", f"ebuilder_{name}")
    used, limit = (re.fullmatch(r"([\d.]+)(\w+)", part.strip()).groups()
                   for part in shown.split("/"))
    return float(used[0]) * UNITS[used[1]], float(limit[0]) * UNITS[limit[1]]


def healthy(service, name: str) -> bool:
    return https_request(service.nginx, f"{name}.stores.test", "/health/")[0] == 200


def data_dir(service, vars_: StoreVars):
    return service.config.customer_data_root / vars_.instance_id


def hold_memory(name: str, mib: int) -> None:
    """The stand-in uses under 1 MiB: a process of the store holds `mib` MiB more."""
    docker("exec", "-d", f"ebuilder_{name}", "sh", "-c",
           f'x=$(head -c {mib * MIB} /dev/zero | tr "\\0" x); sleep 3600; echo ${{#x}}')
    poll(lambda: memory_stats(name)[0] > mib * MIB, timeout=30,
         what=f"{name} using more than {mib} MiB")


def test_limits_are_set_at_creation_and_changed_in_place(service):
    shop = store("lim-raise", memory_mb=64, cpus=0.5, pids_limit=100, disk_mb=100)
    assert provision(service, shop, first=True).ok
    assert limits_of("lim-raise") == {"Memory": 64 * MIB, "MemorySwap": 64 * MIB,
                                      "NanoCpus": 500_000_000, "PidsLimit": 100}
    assert json.loads((data_dir(service, shop) / ".limits").read_text()) == {"disk_mb": 100}
    container_id = inspect("ebuilder_lim-raise")["Id"]
    (data_dir(service, shop) / "media" / "kept.txt").write_text("still here")

    # A fleet run's in-step check sees the plan change; the role changes it in place.
    shop = shop.with_(memory_mb=128, cpus=1.5, pids_limit=200, disk_mb=200)
    outcome = provision(service, shop)
    assert outcome.ok, outcome.error
    assert outcome.changed
    assert limits_of("lim-raise") == {"Memory": 128 * MIB, "MemorySwap": 128 * MIB,
                                      "NanoCpus": 1_500_000_000, "PidsLimit": 200}
    assert memory_stats("lim-raise")[1] == 128 * MIB
    assert inspect("ebuilder_lim-raise")["Id"] == container_id
    assert (data_dir(service, shop) / "media" / "kept.txt").read_text() == "still here"
    assert json.loads((data_dir(service, shop) / ".limits").read_text()) == {"disk_mb": 200}
    assert healthy(service, "lim-raise")

    # Nothing more to do: the in-step check ends the run there.
    again = provision(service, shop)
    assert again.ok and again.changed == 0, again

    # No limit at all, still in place: Docker only takes the kernel's "unlimited" and
    # all of the host's CPUs for that, and the role reads those back as none.
    shop = shop.with_(memory_mb=0, cpus=0, pids_limit=0, disk_mb=0)
    outcome = provision(service, shop)
    assert outcome.ok, outcome.error
    ncpu = int(docker("info", "--format", "{{.NCPU}}"))
    assert limits_of("lim-raise") == {"Memory": NO_MEMORY_LIMIT, "MemorySwap": NO_MEMORY_LIMIT,
                                      "NanoCpus": ncpu * 1_000_000_000, "PidsLimit": 0}
    assert memory_stats("lim-raise")[1] > 128 * MIB
    assert inspect("ebuilder_lim-raise")["Id"] == container_id
    assert provision(service, shop).changed == 0
    assert healthy(service, "lim-raise")


def test_a_memory_downgrade_below_use_is_refused_kept_or_forced(service):
    shop = store("lim-memory", memory_mb=64, cpus=1, pids_limit=100)
    assert provision(service, shop, first=True).ok
    before = inspect("ebuilder_lim-memory")
    hold_memory("lim-memory", 24)

    refused = provision(service, shop.with_(memory_mb=8, cpus=0.5, pids_limit=50))
    print(f"\n{refused.error}")
    assert not refused.ok
    assert re.fullmatch(r"plan refused: ebuilder_lim-memory uses [\d.]+ MiB of memory, "
                        r"more than the plan's 8 MiB; limits left as they were",
                        refused.error), refused.error
    after = inspect("ebuilder_lim-memory")
    assert limits_of("lim-memory") == {"Memory": 64 * MIB, "MemorySwap": 64 * MIB,
                                       "NanoCpus": 1_000_000_000, "PidsLimit": 100}
    assert (after["Id"], after["State"]["StartedAt"]) == \
        (before["Id"], before["State"]["StartedAt"])

    # The plan the store already has (never applied to it): kept as it is, no failure.
    kept = provision(service, shop.with_(memory_mb=8, cpus=0.5, pids_limit=50,
                                         limits_excess="keep"))
    assert kept.ok, kept.error
    # What it fits is applied; the memory it does not, left as it was.
    assert limits_of("lim-memory") == {"Memory": 64 * MIB, "MemorySwap": 64 * MIB,
                                       "NanoCpus": 500_000_000, "PidsLimit": 50}
    assert inspect("ebuilder_lim-memory")["State"]["StartedAt"] == before["State"]["StartedAt"]

    forced = provision(service, shop.with_(memory_mb=8, cpus=0.5, pids_limit=50,
                                           limits_excess="force"))
    assert forced.ok, forced.error
    assert limits_of("lim-memory") == {"Memory": 8 * MIB, "MemorySwap": 8 * MIB,
                                       "NanoCpus": 500_000_000, "PidsLimit": 50}
    assert memory_stats("lim-memory")[1] == 8 * MIB
    # The kernel cannot take back memory in use: the same container restarted within it.
    forced_after = inspect("ebuilder_lim-memory")
    assert forced_after["Id"] == before["Id"]
    assert forced_after["State"]["Running"]
    assert forced_after["State"]["StartedAt"] != before["State"]["StartedAt"]
    assert memory_stats("lim-memory")[0] < 8 * MIB
    assert healthy(service, "lim-memory")


def test_a_store_being_stopped_is_held_to_its_disk_only_and_its_disk_checked(service):
    shop = store("lim-stop", memory_mb=64)
    assert provision(service, shop, first=True).ok
    container_id = inspect("ebuilder_lim-stop")["Id"]
    hold_memory("lim-stop", 24)
    # Suspending a store that downgraded: it will use no memory once stopped.
    stopped = provision(service, shop.with_(memory_mb=8), operation=Operation.STOP)
    assert stopped.ok, stopped.error
    assert not inspect("ebuilder_lim-stop")["State"]["Running"]
    assert limits_of("lim-stop")["Memory"] == 8 * MIB
    started = provision(service, shop.with_(memory_mb=8))
    assert started.ok, started.error
    assert inspect("ebuilder_lim-stop")["Id"] == container_id
    assert memory_stats("lim-stop")[1] == 8 * MIB
    assert healthy(service, "lim-stop")

    # The disk: a downgrade below the data dir's size is refused (the same store).
    shop = shop.with_(memory_mb=64, disk_mb=100)
    assert provision(service, shop).ok
    (data_dir(service, shop) / "media" / "upload.bin").write_bytes(b"x" * 3 * MIB)

    refused = provision(service, shop.with_(disk_mb=2))
    print(f"\n{refused.error}")
    assert not refused.ok
    assert re.fullmatch(r"plan refused: ebuilder_lim-stop's data dir holds 3\.\d MiB, "
                        r"more than the plan's 2 MiB of disk; limits left as they were",
                        refused.error), refused.error
    assert json.loads((data_dir(service, shop) / ".limits").read_text()) == {"disk_mb": 100}

    # Room enough: accepted, and recorded as the limit later downgrades are held to.
    outcome = provision(service, shop.with_(disk_mb=10))
    assert outcome.ok, outcome.error
    assert json.loads((data_dir(service, shop) / ".limits").read_text()) == {"disk_mb": 10}
    # A store that outgrew its disk is not refused a change of its other limits.
    (data_dir(service, shop) / "media" / "more.bin").write_bytes(b"x" * 8 * MIB)
    outcome = provision(service, shop.with_(disk_mb=10, memory_mb=96))
    assert outcome.ok, outcome.error
    assert limits_of("lim-stop")["Memory"] == 96 * MIB
