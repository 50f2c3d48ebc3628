"""The role's limits module decides, from what it read, what to update and what to refuse
(library/ebuilder_instance_limits.py); the in-step check reads the limits the same way."""

from __future__ import annotations

import pytest

from tests.role_modules import library

limits = library("ebuilder_instance_limits")
in_step = library("ebuilder_instance_in_step")
MIB = 1024 * 1024
NCPU = 4


def host(memory_mb=0, swap_mb=None, cpus=0.0, pids=0) -> dict:
    """A HostConfig as Docker returns it (swap = memory unless said otherwise)."""
    memory = memory_mb * MIB
    return {"Memory": memory, "MemorySwap": memory if swap_mb is None else swap_mb * MIB,
            "NanoCpus": round(cpus * 1e9), "PidsLimit": pids}


def wanted(memory_mb=0, cpus=0.0, pids_limit=0, disk_mb=0) -> dict:
    return limits.wanted_limits(memory_mb, cpus, pids_limit, disk_mb, NCPU)


def test_a_container_with_its_plans_limits_needs_no_update():
    assert limits.update_body(host(512, cpus=0.5, pids=256), wanted(512, 0.5, 256), NCPU,
                              True) == {}
    assert limits.update_body(host(), wanted(), NCPU, True) == {}


def test_raising_sends_only_what_differs_and_memory_always_with_swap_equal():
    body = limits.update_body(host(512, cpus=0.5, pids=256), wanted(1024, 0.5, 512), NCPU, True)
    assert body == {"Memory": 1024 * MIB, "MemorySwap": 1024 * MIB, "PidsLimit": 512}
    # Swap on top of the limit (Docker's default of twice the memory) is taken away.
    assert limits.update_body(host(512, swap_mb=1024), wanted(512), NCPU, True) == \
        {"Memory": 512 * MIB, "MemorySwap": 512 * MIB}
    # ... unless the kernel cannot limit swap: Docker then keeps MemorySwap -1 anyway.
    assert limits.update_body({"Memory": 512 * MIB, "MemorySwap": -1}, wanted(512), NCPU,
                              False) == {}


def test_removing_a_limit_writes_what_docker_takes_as_none():
    # 0 means "unchanged" to Docker's update API and -1 is refused for memory and CPUs.
    body = limits.update_body(host(512, cpus=0.5, pids=256), wanted(), NCPU, True)
    assert body == {"Memory": limits.NO_MEMORY_LIMIT, "MemorySwap": limits.NO_MEMORY_LIMIT,
                    "NanoCpus": NCPU * 1_000_000_000, "PidsLimit": -1}
    # ... and those read back as no limit: nothing more to do.
    removed = {"Memory": limits.NO_MEMORY_LIMIT, "MemorySwap": limits.NO_MEMORY_LIMIT,
               "NanoCpus": NCPU * 1_000_000_000, "PidsLimit": 0}
    assert limits.update_body(removed, wanted(), NCPU, True) == {}
    assert limits.current_limits(removed, NCPU, 0) == \
        {"memory_mb": 0, "cpus": 0.0, "pids_limit": 0, "disk_mb": 0}
    assert limits.current_limits({"PidsLimit": None}, NCPU, 0)["pids_limit"] == 0


def test_as_many_cpus_as_the_host_has_is_no_cpu_limit():
    # Docker refuses more CPUs than the host has; a plan's 8 CPUs on 4 is none.
    assert wanted(cpus=8)["cpus"] == 0.0 and wanted(cpus=4)["cpus"] == 0.0
    assert wanted(cpus=1.5)["cpus"] == 1.5
    assert limits.update_body(host(), wanted(cpus=8), NCPU, True) == {}


def test_lowered_limits_include_a_first_limit():
    current = limits.current_limits(host(1024, cpus=1, pids=512), NCPU, 10240)
    assert limits.lowered(current, wanted(512, 2, 512, 20480)) == ["memory_mb"]
    assert limits.lowered(current, wanted(2048, 0.5, 256, 5120)) == \
        ["cpus", "pids_limit", "disk_mb"]
    assert limits.lowered(limits.current_limits(host(), NCPU, 0), wanted(512, 1, 64, 100)) == \
        ["memory_mb", "cpus", "pids_limit", "disk_mb"]
    # Removing a limit lowers nothing.
    assert limits.lowered(current, wanted()) == []


def test_a_downgrade_the_store_does_not_fit_is_refused_with_one_reason_each():
    plan = wanted(8, 0.5, 4, 5)
    usage = {"memory_mb": 31.04, "pids": 5, "disk_mb": 12.01}
    reasons = limits.refusals("ebuilder_x", plan, usage,
                              ["memory_mb", "cpus", "pids_limit", "disk_mb"])
    assert reasons == [
        "ebuilder_x uses 31.1 MiB of memory, more than the plan's 8 MiB",
        "ebuilder_x runs 5 processes, more than the plan's 4",
        "ebuilder_x's data dir holds 12.1 MiB, more than the plan's 5 MiB of disk",
    ]
    assert limits.refusal_message(reasons[:1]) == (
        "plan refused: ebuilder_x uses 31.1 MiB of memory, more than the plan's 8 MiB; "
        "limits left as they were")
    assert limits.refusal_message(reasons).startswith("plan refused: ")
    assert limits.refusal_message(reasons).count(";") == 3


def test_only_lowered_limits_are_held_against_use():
    usage = {"memory_mb": 31.0, "pids": 5, "disk_mb": 12.0}
    # A store that outgrew its disk is not refused a raise of its memory.
    assert limits.refusals("ebuilder_x", wanted(64, disk_mb=5), usage, ["memory_mb"]) == []
    # What it uses within the new limits is fine; CPU is only ever slower.
    assert limits.refusals("ebuilder_x", wanted(32, 0.1, 5, 12),
                           usage, ["memory_mb", "cpus", "pids_limit", "disk_mb"]) == []
    # A stopped container uses no memory and runs no process.
    assert limits.refusals("ebuilder_x", wanted(8, pids_limit=1), {},
                           ["memory_mb", "pids_limit"]) == []


@pytest.mark.parametrize(("stats", "expected"), [
    ({"usage": 40 * MIB, "stats": {"total_inactive_file": 9 * MIB}}, 31 * MIB),  # cgroup v1
    ({"usage": 40 * MIB, "stats": {"inactive_file": 10 * MIB}}, 30 * MIB),        # cgroup v2
    ({"usage": 40 * MIB, "stats": {}}, 40 * MIB),
    ({}, 0),                                                                       # stopped
])
def test_memory_in_use_leaves_out_the_inactive_page_cache(stats, expected):
    assert limits.memory_in_use(stats) == expected


def test_the_data_dir_size_counts_allocated_blocks_and_hard_links_once(tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data").write_bytes(b"x" * 3 * MIB)
    (tmp_path / "db" / "again").hardlink_to(tmp_path / "db" / "data")
    (tmp_path / "sparse").touch()
    with open(tmp_path / "sparse", "wb") as handle:
        handle.truncate(50 * MIB)
    size = limits.dir_size(str(tmp_path))
    assert 3 * MIB <= size < 4 * MIB
    assert limits.dir_size(str(tmp_path / "missing")) == 0


def test_the_recorded_disk_limit_is_read_back_and_none_when_unreadable(tmp_path):
    assert limits.recorded_disk_mb(str(tmp_path)) == 0
    (tmp_path / ".limits").write_text('{"disk_mb": 5120}\n')
    assert limits.recorded_disk_mb(str(tmp_path)) == 5120
    (tmp_path / ".limits").write_text("garbage")
    assert limits.recorded_disk_mb(str(tmp_path)) == 0


@pytest.mark.parametrize(("host_config", "plan"), [
    (host(), {}),
    (host(), {"memory_mb": 512, "cpus": 1.0, "pids_limit": 256}),
    (host(512, cpus=0.5, pids=256), {"memory_mb": 512, "cpus": 0.5, "pids_limit": 256}),
    (host(512, cpus=0.5, pids=256), {"memory_mb": "512", "cpus": "0.5", "pids_limit": "256"}),
    (host(512, swap_mb=1024), {"memory_mb": 512}),
    (host(512, cpus=0.5, pids=256), {}),
    ({"Memory": limits.NO_MEMORY_LIMIT, "MemorySwap": limits.NO_MEMORY_LIMIT,
      "NanoCpus": NCPU * 1_000_000_000, "PidsLimit": 0}, {}),
    (host(cpus=2), {"cpus": 8}),
    (host(), {"cpus": 8}),
    (host(pids=100), {"pids_limit": 0}),
    ({"Memory": 0, "MemorySwap": 0, "NanoCpus": 0, "PidsLimit": None}, {}),
])
def test_the_in_step_check_sees_a_difference_exactly_when_the_module_would_update(
        host_config, plan):
    store = {"memory_mb": 0, "cpus": 0, "pids_limit": 0, **plan}
    module = limits.update_body(host_config, wanted(int(store["memory_mb"]),
                                                    float(store["cpus"]),
                                                    int(store["pids_limit"])), NCPU, True)
    assert in_step.limits_differ(host_config, store, NCPU, True) == bool(module)


def test_only_memory_forced_below_use_restarts_the_store():
    usage = {"memory_mb": 31.0, "pids": 5}
    memory = {"Memory": 8 * MIB, "MemorySwap": 8 * MIB}
    assert limits.restart_needed(memory, wanted(8), usage)
    assert not limits.restart_needed(memory, wanted(32), usage)
    assert not limits.restart_needed({"PidsLimit": 4}, wanted(8, pids_limit=4), usage)
    assert not limits.restart_needed(memory, wanted(8), {})  # stopped


def test_keep_applies_the_limits_a_store_fits_and_leaves_the_others():
    current = {"memory_mb": 0, "cpus": 0.0, "pids_limit": 0, "disk_mb": 0}
    wanted = {"memory_mb": 1024, "cpus": 1.0, "pids_limit": 512, "disk_mb": 10}
    usage = {"memory_mb": 40, "pids": 12, "disk_mb": 300}
    down = limits.lowered(current, wanted)
    assert limits.unfit(wanted, usage, down) == ["disk_mb"]
    assert limits.fitting(current, wanted, ["disk_mb"]) == {**wanted, "disk_mb": 0}
