"""The one run configuration, read once from the environment and `.env`.

Every setting the service, the worker and the playbooks use is named here;
nothing else reads `os.environ`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]


class ConfigError(Exception):
    """A missing or invalid setting; its message is one line naming it."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; `#` comments, blank lines and `export ` prefixes allowed."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _int(env: dict[str, str], name: str, default: int, low: int = 0, high: int = 65535) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _time_of_day(env: dict[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    hours, _, minutes = raw.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60
            and len(minutes) == 2):
        raise ConfigError(f"{name} must be HH:MM, got {raw!r}")
    return f"{int(hours):02d}:{minutes}"


def _required(env: dict[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is required but not set")
    return value


def _networks(env: dict[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDR networks."""
    values = []
    for part in env.get(name, "").split(","):
        if not part.strip():
            continue
        try:
            values.append(str(ipaddress.ip_network(part.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {part.strip()!r} is not an IP address or network") \
                from None
    return tuple(values)


_INSTALLATION_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{2,62}")


def _installation_id(env: dict[str, str]) -> str:
    raw = env.get("INSTALLATION_ID", "").strip()
    if raw and not _INSTALLATION_ID.fullmatch(raw):
        raise ConfigError("INSTALLATION_ID must be 3-63 of a-z, 0-9, '.', '_', '-', "
                          f"starting with a letter or digit, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Config:
    stripe_webhook_secret: str
    base_domain: str
    data_dir: Path
    stripe_secret_key: str = ""
    stripe_price_id: str = ""
    stripe_api_base: str = ""
    stripe_webhook_tolerance: int = 300
    public_url: str = "http://127.0.0.1:8000"
    ebuilder_image: str = "ebuilder-standin:latest"
    customer_data_root: Path = Path("/srv/ebuilder/customers")
    container_network: str = "ebuilder"
    port_range_start: int = 9000
    port_range_end: int = 9999
    nginx_config_dir: Path = Path("/etc/nginx/conf.d")
    nginx_bin: str = "nginx"
    nginx_main_conf: str = ""
    nginx_http_listen: str = "80"
    nginx_https_listen: str = "443"
    wildcard_ssl_cert: str = "/etc/ssl/certs/wildcard.pem"
    wildcard_ssl_key: str = "/etc/ssl/private/wildcard.key"
    default_from_email: str = "eBuilder <noreply@localhost>"
    email_host: str = ""
    email_port: int = 25
    email_host_user: str = ""
    email_host_password: str = field(default="", repr=False)
    email_use_tls: bool = False
    database_url: str = ""
    admin_user: str = "admin"
    admin_password: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    plan_price_pence: int = 1200
    project_dir: Path = PROJECT_DIR
    suspend_after_days: int = 7
    delete_after_days: int = 30
    backup_root: Path = Path("/srv/ebuilder/backups")
    admin_notify_email: str = ""
    inventory_path: str = ""
    max_stores_per_host: int = 100
    health_wait_seconds: int = 60
    health_alert_after: int = 3
    artifact_retention_days: int = 30
    health_interval_minutes: int = 5
    sync_interval_minutes: int = 60
    cleanup_at: str = "03:30"
    job_max_attempts: int = 5
    job_retry_base_seconds: int = 5
    worker_poll_seconds: float = 1.0
    ansible_forks: int = 10
    # Labels every container, network and vhost we make; set by INSTALLATION_ID
    # or generated once into the database (models.open_database).
    installation_id: str = ""
    trusted_proxies: tuple[str, ...] = ()
    check_subdomain_per_minute: int = 60
    checkout_per_minute: int = 10

    @property
    def database_path(self) -> Path:
        return self.data_dir / "provisioner.sqlite3"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def ansible_runs_dir(self) -> Path:
        return self.data_dir / "ansible-runs"

    @property
    def inventory_dir(self) -> Path:
        return self.project_dir / "inventory"

    @property
    def inventory_file(self) -> Path:
        """The Docker hosts (static inventory) the service places stores on."""
        return Path(self.inventory_path) if self.inventory_path else \
            self.inventory_dir / "hosts.yml"

    @property
    def playbooks_dir(self) -> Path:
        return self.project_dir / "playbooks"

    def store_host(self, subdomain: str) -> str:
        return f"{subdomain}.{self.base_domain}"

    def store_url(self, subdomain: str) -> str:
        listen = self.nginx_https_listen
        port = listen.rsplit(":", 1)[-1]
        suffix = "" if port == "443" else f":{port}"
        return f"https://{self.store_host(subdomain)}{suffix}/"

    def secrets(self) -> list[str]:
        """Values that must never be shown, for redaction."""
        values = [self.stripe_secret_key, self.stripe_webhook_secret, self.email_host_password,
                  self.admin_password, self.admin_token]
        return [v for v in values if v]


def load_config(environ: dict[str, str] | None = None, env_file: Path | None = None) -> Config:
    """Build the Config from `.env` (if any) overlaid by the environment."""
    if env_file is None:
        env_file = Path(os.environ.get("PROVISIONER_ENV_FILE", ".env"))
    env = read_env_file(env_file)
    env.update(os.environ if environ is None else environ)

    base_domain = _required(env, "BASE_DOMAIN").lower()
    start = _int(env, "PORT_RANGE_START", 9000, 1024)
    end = _int(env, "PORT_RANGE_END", 9999, 1024)
    if end < start:
        raise ConfigError(f"PORT_RANGE_END ({end}) must not be below PORT_RANGE_START ({start})")
    secret_key = env.get("STRIPE_SECRET_KEY", "")
    if secret_key and not secret_key.startswith(("sk_", "rk_")):
        raise ConfigError("STRIPE_SECRET_KEY must start with sk_ or rk_")
    webhook_secret = _required(env, "STRIPE_WEBHOOK_SECRET")
    if not webhook_secret.startswith("whsec_"):
        raise ConfigError("STRIPE_WEBHOOK_SECRET must start with whsec_")
    data_dir = Path(env.get("PROVISIONER_DATA_DIR") or "/var/lib/ebuilder-provisioner").resolve()
    admin_password = env.get("PROVISIONER_ADMIN_PASSWORD", "")
    return Config(
        stripe_webhook_secret=webhook_secret,
        base_domain=base_domain,
        data_dir=data_dir,
        stripe_secret_key=secret_key,
        stripe_price_id=env.get("STRIPE_PRICE_ID", ""),
        stripe_api_base=env.get("STRIPE_API_BASE", "").rstrip("/"),
        stripe_webhook_tolerance=_int(env, "STRIPE_WEBHOOK_TOLERANCE", 300, 1, 86400),
        public_url=env.get("PROVISIONER_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/"),
        ebuilder_image=env.get("EBUILDER_IMAGE") or "ebuilder-standin:latest",
        customer_data_root=Path(env.get("CUSTOMER_DATA_ROOT") or "/srv/ebuilder/customers"),
        container_network=env.get("CONTAINER_NETWORK") or "ebuilder",
        port_range_start=start,
        port_range_end=end,
        nginx_config_dir=Path(env.get("NGINX_CONFIG_DIR") or "/etc/nginx/conf.d"),
        nginx_bin=env.get("NGINX_BIN") or "nginx",
        nginx_main_conf=env.get("NGINX_MAIN_CONF", ""),
        nginx_http_listen=env.get("NGINX_HTTP_LISTEN") or "80",
        nginx_https_listen=env.get("NGINX_HTTPS_LISTEN") or "443",
        wildcard_ssl_cert=env.get("WILDCARD_SSL_CERT") or "/etc/ssl/certs/wildcard.pem",
        wildcard_ssl_key=env.get("WILDCARD_SSL_KEY") or "/etc/ssl/private/wildcard.key",
        default_from_email=env.get("DEFAULT_FROM_EMAIL") or f"eBuilder <noreply@{base_domain}>",
        email_host=env.get("EMAIL_HOST", ""),
        email_port=_int(env, "EMAIL_PORT", 25, 1),
        email_host_user=env.get("EMAIL_HOST_USER", ""),
        email_host_password=env.get("EMAIL_HOST_PASSWORD", ""),
        email_use_tls=_bool(env, "EMAIL_USE_TLS", False),
        database_url=env.get("DATABASE_URL", ""),
        admin_user=env.get("PROVISIONER_ADMIN_USER") or "admin",
        admin_password=admin_password,
        admin_token=env.get("PROVISIONER_ADMIN_TOKEN", ""),
        plan_price_pence=_int(env, "PLAN_PRICE_PENCE", 1200, 0, 10_000_000),
        suspend_after_days=_int(env, "SUSPEND_AFTER_DAYS", 7, 0, 365),
        delete_after_days=_int(env, "DELETE_AFTER_DAYS", 30, 0, 3650),
        backup_root=Path(env.get("BACKUP_ROOT") or "/srv/ebuilder/backups"),
        admin_notify_email=env.get("ADMIN_NOTIFY_EMAIL", ""),
        inventory_path=env.get("PROVISIONER_INVENTORY", ""),
        max_stores_per_host=_int(env, "MAX_STORES_PER_HOST", 100, 1, 100_000),
        health_wait_seconds=_int(env, "HEALTH_WAIT_SECONDS", 60, 1, 3600),
        health_alert_after=_int(env, "HEALTH_ALERT_AFTER", 3, 1, 100),
        artifact_retention_days=_int(env, "ARTIFACT_RETENTION_DAYS", 30, 1, 3650),
        health_interval_minutes=_int(env, "HEALTH_INTERVAL_MINUTES", 5, 1, 1440),
        sync_interval_minutes=_int(env, "SYNC_INTERVAL_MINUTES", 60, 1, 10080),
        cleanup_at=_time_of_day(env, "CLEANUP_AT", "03:30"),
        job_max_attempts=_int(env, "JOB_MAX_ATTEMPTS", 5, 1, 100),
        job_retry_base_seconds=_int(env, "JOB_RETRY_BASE_SECONDS", 5, 0, 3600),
        installation_id=_installation_id(env),
        trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
        check_subdomain_per_minute=_int(env, "CHECK_SUBDOMAIN_PER_MINUTE", 60, 1, 100_000),
        checkout_per_minute=_int(env, "CHECKOUT_PER_MINUTE", 10, 1, 100_000),
    )
