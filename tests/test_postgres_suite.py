"""The unit suites of the lifecycle, the queue and the worker, run again on a real
PostgreSQL database: a pytest of their files in a subprocess whose one mapped database
(tests/conftest.py) is the fresh database TEST_DATABASE_URL names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The suites whose logic depends on how the database behaves: states and lifecycle,
# the queue and its lanes, the worker's transactions and its recovery after a crash.
SUITES = ("tests/test_lifecycle.py", "tests/test_jobs.py", "tests/test_states.py",
          "tests/test_signup_lane.py", "tests/test_recovery.py",
          "tests/test_worker_transactions.py", "tests/test_events.py",
          "tests/test_intake.py", "tests/test_welcome_email.py")

# Tests of SQLite itself, left out on PostgreSQL, and why.
SQLITE_ONLY = {
    # One worker per SQLite file requeues its dead predecessor's jobs at start; on
    # PostgreSQL a running job may be another live worker's: its lease decides
    # (tests/test_postgres_queue.py: takeover after the lease, none before).
    "tests/test_jobs.py::test_a_job_left_running_by_a_crash_is_picked_up_again":
        "a starting worker leaves running jobs to their lease",
    # SQLite's file lock and busy_timeout (PRAGMA); PostgreSQL writers wait on row locks.
    "tests/test_recovery.py::test_a_busy_database_after_a_send_never_sends_it_twice":
        "SQLite's busy timeout",
    # The SQLite file deleted under the service.
    "tests/test_recovery.py::test_health_fails_when_the_database_file_is_gone":
        "SQLite's file",
}


def test_lifecycle_queue_and_worker_suites_pass_on_postgresql(postgres_server, tmp_path):
    url = postgres_server.create_database("suite")
    env = {**os.environ, "TEST_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'pytest'}", *SUITES,
         *(f"--deselect={test}" for test in SQLITE_ONLY)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the suites failed on PostgreSQL:\n{output[-20000:]}"
    # They ran on PostgreSQL: the database holds what they left of their last test.
    with postgres_server.connect(url.rsplit("/", 1)[1]) as connection, \
            connection.cursor() as cursor:
        cursor.execute("SELECT value FROM setting WHERE key = 'installation_id'")
        assert cursor.fetchone() is not None, output[-5000:]
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, output[-5000:]
    assert f"{len(SQLITE_ONLY)} deselected" in summary, summary
