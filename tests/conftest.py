"""Shared fixtures: one mapped database per test process, emptied before each test."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path

import pytest
from pony.orm import db_session

from provisioner import events, models
from provisioner.ansible import operations
from provisioner.ansible.runner import HostOutcome, RunResult
from provisioner.config import load_config
from provisioner.models import StripeEvent
from provisioner.testing import stripe_events
from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

WEBHOOK_SECRET = "whsec_test_" + "x" * 24
BASE_DOMAIN = "stores.test"
INSTALLATION_ID = f"test-{secrets.token_hex(4)}"
PORT_BASE = int(os.environ.get("TEST_PORT_BASE", "19100"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("provisioner-data")


@pytest.fixture(scope="session")
def base_env(data_dir) -> dict[str, str]:
    return {
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BASE_DOMAIN": BASE_DOMAIN,
        "PROVISIONER_DATA_DIR": str(data_dir),
        # TEST_PORT_BASE lets a second test session run beside this one on the machine.
        "PORT_RANGE_START": str(PORT_BASE),
        "PORT_RANGE_END": str(PORT_BASE + 99),
        "JOB_RETRY_BASE_SECONDS": "0",
        # Marks everything the tests make, so they touch nothing else on the engine.
        "INSTALLATION_ID": INSTALLATION_ID,
        "PATH": os.environ.get("PATH", ""),
        # The tests' one mapped database: SQLite in the data dir, or the PostgreSQL
        # database TEST_DATABASE_URL names (tests/test_postgres_suite.py runs suites so).
        **({"DATABASE_URL": os.environ["TEST_DATABASE_URL"]}
           if os.environ.get("TEST_DATABASE_URL") else {}),
    }


@pytest.fixture(scope="session")
def config(base_env, tmp_path_factory):
    config = load_config(base_env, env_file=tmp_path_factory.mktemp("noenv") / ".env")
    return models.open_database(config)


@pytest.fixture(autouse=True)
def clean_db(config):
    models.reset()
    shutil.rmtree(config.outbox_dir, ignore_errors=True)
    yield


class RecordingRunner:
    """Stands in for ansible-runner: every host succeeds; runs are kept for assertions."""

    def __init__(self):
        self.runs: list[tuple[str, list[dict]]] = []

    def __call__(self, config, playbook, stores, secrets=None, on_event=None, ident=None,
                 **kwargs):
        self.runs.append((playbook, stores))
        return RunResult(ident=ident or "x", playbook=playbook, status="successful", rc=0,
                         artifact_dir=Path("/nonexistent"),
                         hosts={s["name"]: HostOutcome(ok=True) for s in stores})


@pytest.fixture(autouse=True)
def recorded_runs(request):
    """Unit tests run no playbook: the Ansible backend records what it was asked."""
    if "integration" in request.node.nodeid.split("::")[0]:
        yield None
        return
    real, operations.BACKEND = operations.BACKEND, RecordingRunner()
    try:
        yield operations.BACKEND
    finally:
        operations.BACKEND = real


LOCAL_HOSTS = """\
docker_hosts:
  hosts:
    localhost:
      ansible_connection: local
      ansible_python_interpreter: "{{ ansible_playbook_python }}"
"""


@pytest.fixture
def ansible_project(tmp_path, config):
    """A config whose project dir has the real playbooks and roles, an inventory of
    localhost only, and its own data dir: for real ansible-playbook runs in unit tests."""
    project = Path(__file__).resolve().parents[1]
    root = tmp_path / "project"
    (root / "playbooks").mkdir(parents=True)
    for item in (project / "playbooks").iterdir():
        (root / "playbooks" / item.name).symlink_to(item)
    (root / "inventory").mkdir()
    (root / "inventory" / "hosts.yml").write_text(LOCAL_HOSTS)
    (root / "ansible.cfg").symlink_to(project / "ansible.cfg")
    (root / "roles").symlink_to(project / "roles")
    return dataclasses.replace(config, project_dir=root, data_dir=tmp_path / "data")


def apply_events(config, evts: list[dict]) -> None:
    """Record and apply events the way the worker does, without running playbooks."""
    for evt in evts:
        with db_session:
            stored = StripeEvent.get(stripe_id=evt["id"]) or StripeEvent(
                stripe_id=evt["id"], type=evt["type"], payload=json.dumps(evt))
            events.apply(config, stored)


@pytest.fixture
def signup_events():
    return stripe_events.signup


SUITE_ORDER = ("integration", "faults")


def pytest_collection_modifyitems(items):
    """Unit tests first (the integration suite's live worker thread must not see their
    data), then integration, then the fault-injection suite."""
    def suite(item) -> int:
        parts = item.nodeid.split("::")[0].split("/")
        return next((n + 1 for n, name in enumerate(SUITE_ORDER) if name in parts), 0)

    items.sort(key=suite)
