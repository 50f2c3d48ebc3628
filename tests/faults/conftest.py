"""Fault injection on real processes: `provisioner serve` in its own process, the Docker
engine, nginx, an SMTP server, SQLite on disk. One stack per module (its own data dir,
nginx, SMTP, network, ports and installation id); each test starts the service it needs.

Every case prints its measured recovery time in the run's summary ("fault recovery").
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from provisioner.testing.faults import Stack

IMAGE = "ebuilder-standin:latest"
# (test, what, seconds): printed at the end of the run.
MEASURED: list[tuple[str, str, float]] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "faults: fault injection on real processes (Docker, nginx, SMTP, SQLite)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The fault cases last: the slowest, and a broken unit should show first."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/faults/"))


@pytest.fixture(scope="session")
def real_parts():
    """What the suite drives for real: fail (not skip) when the machine lacks it."""
    for tool in ("docker", "dockerd", "nginx", "openssl", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/setup.sh")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine answers: run scripts/setup.sh first")
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        pytest.fail(f"{IMAGE} is missing: run scripts/setup.sh")


def module_name(request) -> str:
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "")[:12]


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, real_parts):
    world = Stack(tmp_path_factory.mktemp("faults"), module_name(request))
    try:
        yield world.start()
    finally:
        world.close()


@pytest.fixture(autouse=True)
def services_stopped(request):
    """A test's service processes end with it; the module's stack lives on."""
    yield
    if "stack" in request.fixturenames:
        world = request.getfixturevalue("stack")
        for service in world.services:
            service.stop()


@pytest.fixture
def measured(request):
    """Record a measured time of this case (recovery, stop...) for the run's summary."""
    def record(what: str, seconds: float) -> None:
        MEASURED.append((request.node.name, what, seconds))
        print(f"{request.node.name}: {what} {seconds:.1f} s")
    started = time.monotonic()
    yield record
    MEASURED.append((request.node.name, "whole case", time.monotonic() - started))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed case shows the end of the service's log."""
    outcome = yield
    report = outcome.get_result()
    world = item.funcargs.get("stack") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(world, Stack) and world.services:
        report.sections.append(("provisioner serve log (tail)",
                                world.services[-1].log_tail(80)))


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("fault recovery")
    for test, what, seconds in MEASURED:
        terminalreporter.write_line(f"{test:<66} {what:<38} {seconds:6.1f} s")
