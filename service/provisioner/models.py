"""What the service knows, in Pony entities.

Instances are never deleted as rows: `live` turns false when a store is
destroyed, which releases its subdomain and port (partial unique indexes
enforce "unique among live instances" in the database itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlparse

from pony.orm import (
    Database,
    LongStr,
    Optional,
    PrimaryKey,
    Required,
    Set,
    TransactionIntegrityError,
    composite_index,
    composite_key,
    db_session,
)

from provisioner.config import Config, ConfigError

db = Database()
log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Naive UTC, the form Pony stores."""
    return datetime.now(UTC).replace(tzinfo=None)


class Customer(db.Entity):
    id = PrimaryKey(int, auto=True)
    stripe_id = Optional(str, unique=True, nullable=True)
    email = Required(str)
    created_at = Required(datetime, default=utcnow)
    subscriptions = Set("Subscription")
    instances = Set("Instance")


class Subscription(db.Entity):
    id = PrimaryKey(int, auto=True)
    stripe_id = Required(str, unique=True)
    customer = Optional(Customer)
    stripe_customer_id = Optional(str, nullable=True)
    # Stripe's own status word (active, past_due, ...); None until known.
    status = Optional(str, nullable=True, index=True)
    payment_confirmed = Required(bool, default=False)
    # Time of the newest subscription snapshot applied: an older one that
    # arrives late (Stripe does not promise order) never overwrites it.
    status_at = Optional(datetime)
    past_due_since = Optional(datetime)
    current_period_start = Optional(datetime)
    current_period_end = Optional(datetime)
    cancel_at = Optional(datetime)
    canceled_at = Optional(datetime, index=True)
    # The Stripe Price of its (first) item, and what it bills a month (minor units).
    price_id = Optional(str, nullable=True)
    monthly_amount = Optional(int)
    currency = Optional(str, nullable=True)
    trial_end = Optional(datetime)
    # Time of the newest subscription snapshot whose price and trial were taken (a paid
    # invoice can move status_at past a snapshot that still has the newer price).
    snapshot_at = Optional(datetime)
    created_at = Required(datetime, default=utcnow)
    updated_at = Required(datetime, default=utcnow)
    instances = Set("Instance")


class Instance(db.Entity):
    id = PrimaryKey(int, auto=True)
    subdomain = Required(str)
    site_name = Required(str)
    admin_email = Required(str)
    # The first-boot password, kept only until the welcome email is out.
    admin_password = Optional(str, nullable=True)
    customer = Optional(Customer)
    subscription = Optional(Subscription)
    checkout_session_id = Optional(str, unique=True, nullable=True)
    port = Required(int)
    docker_host = Required(str, default="localhost")
    # Actual state: a states.StoreState, written only by states.transition.
    status = Required(str, default="pending")
    # What billing says it should be (lifecycle.desired_state).
    desired_state = Required(str, default="pending")
    status_message = Optional(LongStr, nullable=True)
    # False once destroyed (or never given its name): frees subdomain and port.
    live = Required(bool, default=True)
    welcome_sent_at = Optional(datetime)
    provisioned_at = Optional(datetime)
    # The image it runs; None means the configured EBUILDER_IMAGE.
    image = Optional(str, nullable=True)
    health_failures = Required(int, default=0)
    health_checks = Set("HealthCheck")
    # An admin stopped it: billing alone does not start it again.
    admin_hold = Required(bool, default=False)
    # The plan (Stripe Price) whose limits its container has; None until provisioned.
    plan_price_id = Optional(str, nullable=True)
    # A change to this plan was refused (the store uses more than it allows) and why:
    # the store keeps plan_price_id until an admin applies it or the plan changes again.
    plan_refused = Optional(str, nullable=True)
    plan_problem = Optional(str, nullable=True)
    # An admin said: apply the plan's limits even below what the store uses.
    plan_force = Required(bool, default=False)
    # What its data dir takes (MiB), measured by the health sweep; since when it is
    # over its plan's disk (one admin alert per such stretch).
    disk_used_mb = Optional(float)
    disk_measured_at = Optional(datetime)
    disk_over_since = Optional(datetime)
    # Start of the current suspension or closure; keys its notices.
    stopped_since = Optional(datetime)
    delete_after = Optional(datetime)
    archive_path = Optional(str, nullable=True)
    destroyed_at = Optional(datetime)
    created_at = Required(datetime, default=utcnow, index=True)
    updated_at = Required(datetime, default=utcnow)
    jobs = Set("Job")
    logs = Set("LogEntry")
    notifications = Set("Notification")
    backups = Set("Backup")
    domains = Set("CustomDomain")
    alert_incidents = Set("AlertIncident")
    # An admin chose to show its uptime on the public status page.
    uptime_public = Required(bool, default=False)
    # The admin list filters by state, newest first (admin.list_instances).
    composite_index(status, id)

    @property
    def container_name(self) -> str:
        return f"ebuilder_{self.subdomain}"


class SubdomainHold(db.Entity):
    """A name promised to an open Checkout Session, so no one else pays for it meanwhile."""

    id = PrimaryKey(int, auto=True)
    subdomain = Required(str, unique=True)
    checkout_session_id = Required(str, unique=True)
    email = Required(str)
    expires_at = Required(datetime)


class StripeEvent(db.Entity):
    id = PrimaryKey(int, auto=True)
    stripe_id = Required(str, unique=True)
    type = Required(str)
    payload = Required(LongStr)
    received_at = Required(datetime, default=utcnow)
    processed_at = Optional(datetime)
    failed_at = Optional(datetime, index=True)
    error = Optional(LongStr, nullable=True)
    # Deliveries after the first (Stripe retries, replays by hand are jobs).
    duplicates = Required(int, default=0)
    # Whose it is, once applied: the customer's admin page lists their events.
    stripe_customer_id = Optional(str, nullable=True)
    jobs = Set("Job")


class WebhookDelivery(db.Entity):
    """One POST to the webhook: accepted, duplicate or rejected with the reason.

    The operators' view of what Stripe (or anyone) sent; rotated like the logs.
    """

    id = PrimaryKey(int, auto=True)
    at = Required(datetime, default=utcnow, index=True)
    outcome = Required(str)  # accepted | duplicate | rejected | busy
    stripe_id = Optional(str, nullable=True, index=True)
    type = Optional(str, nullable=True)
    reason = Optional(str, nullable=True)
    address = Optional(str, nullable=True)


class AuditEntry(db.Entity):
    """Who did what from the admin API, pages or CLI."""

    id = PrimaryKey(int, auto=True)
    at = Required(datetime, default=utcnow, index=True)
    actor = Required(str)  # admin user, "token", or "cli:<unix user>"
    action = Required(str)
    target = Optional(str, nullable=True, index=True)
    detail = Optional(str, nullable=True)
    address = Optional(str, nullable=True)


class AnsibleRun(db.Entity):
    id = PrimaryKey(int, auto=True)
    ident = Required(str, unique=True)
    playbook = Required(str)
    # running | successful | failed | error | canceled | timeout | abandoned
    status = Required(str, default="running")
    rc = Optional(int)
    # ansible-playbook's process, so a later worker can end one its dead predecessor left.
    pid = Optional(int)
    artifact_dir = Required(str)
    started_at = Required(datetime, default=utcnow)
    finished_at = Optional(datetime)
    # A run a sysadmin started by hand: "<user> on <host>" (sysadmin_runs); None: ours.
    started_by = Optional(str, nullable=True)
    jobs = Set("Job")
    logs = Set("LogEntry")


class Job(db.Entity):
    id = PrimaryKey(int, auto=True)
    # A states.JobKind.
    kind = Required(str)
    # What exactly, for kinds that need it (notify: "notice|episode key").
    detail = Optional(str, nullable=True)
    instance = Optional(Instance)
    event = Optional(StripeEvent)
    # A states.JobState.
    state = Required(str, default="queued", index=True)
    attempts = Required(int, default=0)
    next_run_at = Required(datetime, default=utcnow)
    # A running job whose lease ran out (its worker died) is claimable again.
    locked_until = Optional(datetime)
    last_error = Optional(LongStr, nullable=True)
    ansible_run = Optional(AnsibleRun)
    created_at = Required(datetime, default=utcnow)
    finished_at = Optional(datetime)
    logs = Set("LogEntry")


class HealthCheck(db.Entity):
    """One store's result in one health sweep: the health history."""

    id = PrimaryKey(int, auto=True)
    instance = Required(Instance)
    at = Required(datetime, default=utcnow, index=True)
    ok = Required(bool)
    detail = Optional(str, nullable=True)
    action = Optional(str, nullable=True)


class Backup(db.Entity):
    """One archive of a store's data dir on its Docker host: what made it, its checksum."""

    id = PrimaryKey(int, auto=True)
    instance = Required(Instance)
    # The tar.gz on the store's Docker host (under BACKUP_ROOT), and that host.
    path = Required(str)
    docker_host = Required(str)
    # scheduled | manual | clone | pre-restore
    reason = Required(str, default="manual")
    # pending | ok | failed | deleted
    status = Required(str, default="pending", index=True)
    sha256 = Optional(str, nullable=True)
    size_bytes = Optional(int, size=64)
    # Where its second copy went (BACKUP_COPY_TO), once copied and verified.
    copy_path = Optional(str, nullable=True)
    error = Optional(LongStr, nullable=True)
    created_at = Required(datetime, default=utcnow, index=True)
    finished_at = Optional(datetime)
    deleted_at = Optional(datetime)


class CustomDomain(db.Entity):
    """A customer's own host name for a store, with its ACME certificate."""

    id = PrimaryKey(int, auto=True)
    instance = Required(Instance)
    # Lower-case host name, e.g. shop.example.com.
    name = Required(str)
    # dns_pending | issuing | live | failed | removing | removed
    status = Required(str, default="dns_pending")
    cert_path = Optional(str, nullable=True)
    key_path = Optional(str, nullable=True)
    expires_at = Optional(datetime)
    last_error = Optional(LongStr, nullable=True)
    checked_at = Optional(datetime)
    created_at = Required(datetime, default=utcnow)
    removed_at = Optional(datetime)


class AlertIncident(db.Entity):
    """One thing that went wrong, alerted once when it opens and once when it clears."""

    id = PrimaryKey(int, auto=True)
    # Stable across sweeps for the same problem, e.g. "store_down:42".
    key = Required(str, index=True)
    # provision_failed | store_down | backup_failed | cert_renewal_failed | disk_full
    kind = Required(str)
    instance = Optional(Instance)
    summary = Required(LongStr)
    opened_at = Required(datetime, default=utcnow)
    last_seen_at = Required(datetime, default=utcnow)
    resolved_at = Optional(datetime)
    deliveries = Set("AlertDelivery")


class AlertDelivery(db.Entity):
    """One message (opened or resolved) of an incident to one target, retried until sent."""

    id = PrimaryKey(int, auto=True)
    incident = Required(AlertIncident)
    # "email", or "webhook <n> (<host>)" for the n-th of ALERT_WEBHOOKS: never its URL,
    # which may be a secret (Slack's are).
    target = Required(str)
    # opened | resolved
    event = Required(str)
    # pending | sent | failed
    status = Required(str, default="pending", index=True)
    attempts = Required(int, default=0)
    next_try_at = Required(datetime, default=utcnow)
    last_error = Optional(LongStr, nullable=True)
    sent_at = Optional(datetime)
    composite_key(incident, target, event)


class Notification(db.Entity):
    """An email that went out; (instance, notice, key) makes each send once-only."""

    id = PrimaryKey(int, auto=True)
    instance = Optional(Instance)
    notice = Required(str)
    key = Required(str, default="-")
    recipient = Required(str)
    # "sending" is written and committed before the SMTP exchange, "sent" after it:
    # a send whose "sent" could not be written at once is never sent again.
    status = Required(str, default="sent")
    sent_at = Required(datetime, default=utcnow)
    composite_key(instance, notice, key)


class LogEntry(db.Entity):
    id = PrimaryKey(int, auto=True)
    at = Required(datetime, default=utcnow)
    level = Required(str, default="info")
    message = Required(LongStr)
    instance = Optional(Instance)
    job = Optional(Job)
    ansible_run = Optional(AnsibleRun)
    task = Optional(str, nullable=True)
    outcome = Optional(str, nullable=True)
    duration = Optional(float)


class Setting(db.Entity):
    """A value the service made for itself once (the installation id)."""

    key = PrimaryKey(str)
    value = Required(str)


LIVE_UNIQUE_INDEXES = (
    'CREATE UNIQUE INDEX IF NOT EXISTS "instance_live_subdomain" '
    'ON "Instance" ("subdomain") WHERE "live"',
    'CREATE UNIQUE INDEX IF NOT EXISTS "instance_live_port" '
    'ON "Instance" ("docker_host", "port") WHERE "live"',
    'CREATE INDEX IF NOT EXISTS "stripeevent_customer" ON "StripeEvent" ("stripe_customer_id")',
    # One live claim of a custom domain; one open incident per problem.
    'CREATE UNIQUE INDEX IF NOT EXISTS "customdomain_live_name" '
    'ON "CustomDomain" ("name") WHERE "removed_at" IS NULL',
    'CREATE UNIQUE INDEX IF NOT EXISTS "alertincident_open_key" '
    'ON "AlertIncident" ("key") WHERE "resolved_at" IS NULL',
)

# Columns added since a table was first made: (table, column, SQLite type, PostgreSQL
# type). Pony creates missing tables but never alters one, so an upgraded service adds
# these before mapping; each only once (a column already there is left alone).
ADDED_COLUMNS = (
    ("Subscription", "price_id", "TEXT", "TEXT"),
    ("Subscription", "monthly_amount", "INTEGER", "INTEGER"),
    ("Subscription", "currency", "TEXT", "TEXT"),
    ("Subscription", "trial_end", "DATETIME", "TIMESTAMP"),
    ("Subscription", "snapshot_at", "DATETIME", "TIMESTAMP"),
    ("Instance", "plan_price_id", "TEXT", "TEXT"),
    ("Instance", "plan_refused", "TEXT", "TEXT"),
    ("Instance", "plan_problem", "TEXT", "TEXT"),
    ("Instance", "plan_force", "BOOLEAN NOT NULL DEFAULT 0", "BOOLEAN NOT NULL DEFAULT false"),
    ("StripeEvent", "stripe_customer_id", "TEXT", "TEXT"),
    ("Instance", "disk_used_mb", "REAL", "DOUBLE PRECISION"),
    ("Instance", "disk_measured_at", "DATETIME", "TIMESTAMP"),
    ("Instance", "disk_over_since", "DATETIME", "TIMESTAMP"),
    ("Instance", "uptime_public", "BOOLEAN NOT NULL DEFAULT 0", "BOOLEAN NOT NULL DEFAULT false"),
    ("AnsibleRun", "started_by", "TEXT", "TEXT"),
)


def _add_columns(database: Database) -> None:
    """ALTER TABLE ... ADD COLUMN for each of ADDED_COLUMNS an existing table lacks."""
    provider = database.provider
    postgres = database.provider_name == "postgres"
    connection = database.get_connection()
    cursor = connection.cursor()
    for table, column, sqlite_type, postgres_type in ADDED_COLUMNS:
        # As Pony names them (PostgreSQL's are lower case).
        name, field = provider.normalize_name(table), provider.normalize_name(column)
        if postgres:
            cursor.execute("SELECT column_name FROM information_schema.columns "
                           "WHERE table_schema = current_schema() AND table_name = %s",
                           (name,))
        else:
            cursor.execute(f"PRAGMA table_info({provider.quote_name(name)})")
        columns = {row[0 if postgres else 1] for row in cursor.fetchall()}
        if columns and field not in columns:
            kind = postgres_type if postgres else sqlite_type
            cursor.execute(f"ALTER TABLE {provider.quote_name(name)} "
                           f"ADD COLUMN {provider.quote_name(field)} {kind}")
            log.warning("database: added column %s.%s", table, column)
    connection.commit()


def bind(config: Config) -> Database:
    """Bind and map the database once per process; later calls are no-ops.

    SQLite (the default) is one machine's file. PostgreSQL (`DATABASE_URL`) is shared by
    the web service and any number of workers on other machines: the schema is made or
    upgraded by one process at a time (an advisory lock), so processes starting together
    never trip over each other's CREATE TABLE or ALTER TABLE."""
    if db.provider is not None:
        return db
    url = config.database_url
    private_dir(config.data_dir)
    if not url or url.startswith("sqlite"):
        path = Path(urlparse(url).path if url else str(config.database_path))
        _refuse_a_lost_database(config, path)
        _private_file(path)
        db.bind(provider="sqlite", filename=str(path), create_db=True,
                timeout=config.db_busy_timeout_seconds)
        _bound_file.update(path=path, inode=path.stat().st_ino)
        _map(db)
    elif url.startswith(("postgres://", "postgresql://")):
        options = postgres_options(url)
        try:
            import psycopg2  # noqa: F401 (Pony's PostgreSQL provider needs it)
        except ImportError:
            raise ConfigError("DATABASE_URL names PostgreSQL but psycopg2 is not installed: "
                              "pip install 'ebuilder-provisioner[postgres]'") from None
        db.bind(provider="postgres", **options)
        with _schema_lock(options):
            _map(db)
    else:
        # Only its scheme: the rest may hold a password.
        raise ConfigError("DATABASE_URL must be sqlite:///path or postgresql://..., got "
                          f"{urlparse(url).scheme or 'no scheme'}://...")
    return db


def postgres_options(url: str) -> dict:
    """psycopg2's connect() arguments from postgresql://user:password@host:port/name?k=v
    (user and password percent-decoded; query options such as sslmode passed on)."""
    parsed = urlparse(url)
    options: dict = {"database": unquote(parsed.path.lstrip("/"))}
    if parsed.username:
        options["user"] = unquote(parsed.username)
    if parsed.password:
        options["password"] = unquote(parsed.password)
    if parsed.hostname:
        options["host"] = parsed.hostname
    if parsed.port:
        options["port"] = parsed.port
    options.update(parse_qsl(parsed.query))
    if not options["database"]:
        raise ConfigError("DATABASE_URL names no database: postgresql://user@host/NAME")
    return options


def shared_database() -> bool:
    """True when the database is PostgreSQL: the web service and several workers (maybe
    on other machines) share it, so claims and one-off creations must be safe across
    processes, not only across threads."""
    return db.provider is not None and db.provider_name == "postgres"


# pg_advisory_lock keys (one 64-bit space per database): making the schema, claiming jobs,
# queueing a job (with a hash of what the job is in the second half of the key).
SCHEMA_LOCK = 0x65620001
CLAIM_LOCK = 0x65620002
ENQUEUE_LOCK = 0x6562


@contextlib.contextmanager
def _schema_lock(options: dict):
    """Hold PostgreSQL's session advisory lock SCHEMA_LOCK on a connection of its own
    (Pony's are reset with DISCARD ALL when a db_session ends, which would drop it)."""
    import psycopg2

    connection = psycopg2.connect(**options)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        yield
    finally:
        connection.close()  # ends the session, and with it the lock


def _map(database: Database) -> None:
    """Add the columns an older schema lacks, map (creating missing tables), then the
    partial unique indexes Pony cannot declare."""
    with db_session:
        _add_columns(database)
    database.generate_mapping(create_tables=True)
    with db_session:
        for statement in _index_statements(database):
            database.execute(statement)


def _index_statements(database: Database) -> list[str]:
    """LIVE_UNIQUE_INDEXES with the names as this database's Pony made them
    (PostgreSQL's are lower case: a quoted "Instance" would name no table)."""
    if database.provider_name != "postgres":
        return list(LIVE_UNIQUE_INDEXES)
    normalize = database.provider.normalize_name
    return [re.sub(r'"([^"]+)"', lambda m: f'"{normalize(m.group(1))}"', statement)
            for statement in LIVE_UNIQUE_INDEXES]


# The SQLite file this process opened, to notice it being deleted or replaced.
_bound_file: dict = {}


def _marker(config: Config) -> Path:
    return config.data_dir / ".database-created"


def _refuse_a_lost_database(config: Config, path: Path) -> None:
    """A data dir that had a database and lost it must not start an empty one: every
    running store would be orphaned. The marker is written the first time."""
    marker = _marker(config)
    if path.exists():
        if not marker.exists():
            marker.write_text(f"{path}\n")
        return
    if marker.exists():
        raise ConfigError(
            f"the database {path} is missing, but this data dir had one "
            f"({marker} was written with it); restore it from a backup, or delete "
            f"{marker} to start an empty database on purpose")
    private_dir(config.data_dir)
    marker.write_text(f"{path}\n")


def database_problem() -> str | None:
    """Why the database cannot be used now, or None (for /api/health/)."""
    path = _bound_file.get("path")
    if path is not None:
        try:
            if path.stat().st_ino != _bound_file["inode"]:
                return f"database file {path} was replaced"
        except FileNotFoundError:
            return f"database file {path} is missing"
    try:
        with db_session:
            db.select("SELECT 1")
    except Exception as exc:  # any failure to read means unhealthy
        return f"database unreadable: {type(exc).__name__}"
    return None


def checkpoint_wal() -> None:
    """Fold SQLite's write-ahead log into the database and empty it: a deleted secret
    (an emailed password) must not live on in old WAL frames. Best effort: a reader
    still on an old snapshot only delays it to the next call."""
    path = _bound_file.get("path")
    if path is None:
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        log.warning("WAL checkpoint failed: %s", exc)


# The database cannot take a write now, but will later: a webhook answers 503 with
# Retry-After, the worker keeps trying to record what already happened.
BUSY_MESSAGES = ("database is locked", "database table is locked", "database is busy",
                 "database or disk is full")


def database_busy(exc: BaseException) -> bool:
    """Did this fail because another writer held the database past the busy timeout?"""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, sqlite3.OperationalError) and \
                any(message in str(current) for message in BUSY_MESSAGES):
            return True
        pending += [current.__cause__, current.__context__]
        # Pony's CommitException keeps the failures of its commit as exc_info tuples.
        pending += [info[1] for info in getattr(current, "exceptions", None) or ()
                    if isinstance(info, tuple) and len(info) == 3]
    return False


# How long what already happened outside (an email sent, a run ended) is retried
# into a busy or full database before it is given up (and logged).
RECORD_PATIENCE_SECONDS = 600


def record_durably(work, what: str, logger: logging.Logger = log,
                   patience: float = RECORD_PATIENCE_SECONDS) -> bool:
    """Write what already happened outside the database (an email sent, a run ended):
    keep trying while the database is busy or full, so it is never done twice nor left
    looking unfinished. False when the patience ran out; any other error is raised."""
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            with db_session:
                work()
            return True
        except Exception as exc:
            if not database_busy(exc):
                raise  # not the database being busy or full: retrying cannot help
            if time.monotonic() > deadline:
                logger.exception("gave up recording %s", what)
                return False
            logger.warning("database unwritable while recording %s; trying again", what)
            time.sleep(delay)
            delay = min(delay * 2, 5)


def private_dir(path: Path) -> Path:
    """A directory only the service's user can enter (made 0700, tightened if older)."""
    path.mkdir(parents=True, mode=0o700, exist_ok=True)
    path.chmod(0o700)
    return path


def _private_file(path: Path) -> None:
    """The SQLite file holds temporary passwords until they are emailed: 0600."""
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)


@db.on_connect(provider="sqlite")
def _sqlite_pragmas(database, connection) -> None:
    cursor = connection.cursor()
    # Deleted rows (an emailed password) are overwritten, not left in free pages.
    cursor.execute("PRAGMA secure_delete = ON")
    # Readers never block the writer (a page or a report never holds up a webhook).
    cursor.execute("PRAGMA journal_mode = WAL")
    # One connection per server thread: keep each page cache small (512 KiB).
    cursor.execute("PRAGMA cache_size = -512")


def installation_id(config: Config) -> str:
    """This database's installation id (needs bind): generated, or INSTALLATION_ID, on
    first use and kept. A different INSTALLATION_ID later is refused: everything this
    installation made carries the old one, so every store would look foreign."""
    value = kept_setting("installation_id",
                         lambda: config.installation_id or f"eb-{secrets.token_hex(6)}")
    if config.installation_id and value != config.installation_id:
        raise ConfigError(
            f"INSTALLATION_ID is {config.installation_id!r} but this database "
            f"belongs to installation {value!r}; unset it or set it back")
    return value


def kept_setting(key: str, make=lambda: secrets.token_hex(32)) -> str:
    """A value made once for this database and kept (the installation id, the signing key
    of the customers' account links). open_database makes them in their own transaction:
    one made inside a request's could roll back after a link was signed with it."""
    for _ in range(2):
        try:
            with db_session:
                row = Setting.get(key=key) or Setting(key=key, value=make())
                return row.value
        except TransactionIntegrityError:
            continue  # another process made it at the same moment: read theirs
    raise ConfigError(f"could not read or create the database's {key}")


ACCOUNT_LINK_KEY = "account_link_key"


def open_database(config: Config) -> Config:
    """Bind the database and return the config with its installation id filled in."""
    bind(config)
    kept_setting(ACCOUNT_LINK_KEY)
    return dataclasses.replace(config, installation_id=installation_id(config))


def reset() -> None:
    """Empty every table (tests share one mapped database per process)."""
    with db_session:
        for entity in (AlertDelivery, AlertIncident, Backup, CustomDomain,
                       LogEntry, HealthCheck, Notification, SubdomainHold, Job, AnsibleRun,
                       StripeEvent, WebhookDelivery, AuditEntry, Instance, Subscription,
                       Customer):
            entity.select().delete(bulk=True)
