"""A real PostgreSQL server for the tests: Debian's `postgresql` package, run as the
`postgres` user (it refuses root) in a fresh temporary directory, on 127.0.0.1 on a
free port and a unix socket in that directory, with fsync off. One per test session
(`postgres_server`), a fresh database per use (`create_database`); stopping it deletes
its directory, leaving nothing behind.

Without PostgreSQL the tests that need it fail when CI is set, and skip otherwise."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from provisioner.testing.stack import free_port

START_TIMEOUT = 60.0
USER = "postgres"


class PostgresUnavailable(Exception):
    """PostgreSQL is not installed here, or did not start: the reason."""


def binaries() -> Path:
    """The newest installed server's bin dir (/usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        raise PostgresUnavailable("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/"
                                  "initdb): run scripts/setup.sh --with-browser")
    return Path(found[-1]).parent


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as its own system user."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root without runuser to become postgres")
    return ["runuser", "-u", USER, "--", *argv]


class PostgresServer:
    def __init__(self) -> None:
        self.root: Path | None = None
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def start(self) -> PostgresServer:
        bin_dir = binaries()
        try:
            import pwd

            owner = pwd.getpwnam(USER)
        except KeyError:
            raise PostgresUnavailable(f"no {USER!r} system user") from None
        self.root = Path(tempfile.mkdtemp(prefix="provisioner-pg-"))
        data = self.root / "data"
        if os.geteuid() == 0:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        result = subprocess.run(
            _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", USER,
                          "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]),
            capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stderr.strip()[-2000:]}")
        for _ in range(3):  # a free port can be taken by someone else before we bind it
            self.port = free_port()
            with open(self.log_file, "ab") as log:
                self.process = subprocess.Popen(
                    _as_postgres([str(bin_dir / "postgres"), "-D", str(data),
                                  "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                                  "-c", f"unix_socket_directories={self.root}",
                                  "-c", "fsync=off", "-c", "synchronous_commit=off",
                                  "-c", "full_page_writes=off", "-c", "max_connections=200"]),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready():
                return self
        raise PostgresUnavailable(f"postgres did not start: {self._log_tail()}")

    def _wait_ready(self) -> bool:
        """Poll until the server accepts a connection (True) or its process ended (False)."""
        import psycopg2

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                psycopg2.connect(**self.options("postgres"), connect_timeout=2).close()
                return True
            except psycopg2.OperationalError:
                time.sleep(0.05)
        self._end()
        raise PostgresUnavailable(f"postgres not ready after {START_TIMEOUT} s: "
                                  f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def options(self, database: str) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "user": USER, "dbname": database}

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str):
        """A psycopg2 connection (autocommit) to `database`, for checks from outside Pony."""
        import psycopg2

        connection = psycopg2.connect(**self.options(database))
        connection.autocommit = True
        return connection

    def create_database(self, prefix: str = "provisioner") -> str:
        """A fresh, empty database; its DATABASE_URL."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        with contextlib.closing(self.connect("postgres")) as connection, \
                connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _end(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # To the group (runuser and postgres): "fast" shutdown, sessions ended.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        self._end()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def unavailable(reason: str):
    """Fail (CI set: PostgreSQL is part of the tested setup) or skip (a laptop)."""
    message = f"PostgreSQL unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    try:
        server.start()
    except (PostgresUnavailable, ImportError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database on the session's server."""
    return postgres_server.create_database()
