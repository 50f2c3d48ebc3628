"""The one run configuration, read once from the environment and `.env`.

Every setting the service, the worker and the playbooks use is a row of
settings.SETTINGS (its name, default, parser and meaning). Nothing else reads
`os.environ`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.settings import REQUIRED, SETTINGS, ConfigError, settings_table

__all__ = ["Config", "ConfigError", "load_config", "read_env_file", "settings_table"]

PROJECT_DIR = Path(__file__).resolve().parents[2]
# Where systemd's units read the service's settings (deploy/systemd/).
SYSTEM_ENV_FILE = Path("/etc/ebuilder-provisioner.env")


def env_file_path(environ: dict[str, str] | None = None) -> Path:
    """The settings file: PROVISIONER_ENV_FILE, else the first of `./.env`, the
    project's own `.env` and the units' /etc file that exists. A sysadmin's command or
    playbook run from any directory then reads what the service reads."""
    named = (os.environ if environ is None else environ).get("PROVISIONER_ENV_FILE")
    if named:
        return Path(named)
    candidates = (Path(".env"), PROJECT_DIR / ".env", SYSTEM_ENV_FILE)
    return next((path for path in candidates if path.is_file()), candidates[0])


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


@dataclass(frozen=True)
class Config:
    """The settings, by field name (SETTINGS says which variable sets each, and its default)."""

    stripe_webhook_secret: str = field(repr=False)
    base_domain: str
    stripe_secret_key: str = field(repr=False)
    stripe_price_id: str
    plans_file: str
    trial_days: int
    stripe_api_base: str
    stripe_webhook_tolerance: int
    public_url: str
    data_dir: Path
    database_url: str = field(repr=False)
    ebuilder_image: str
    customer_data_root: Path
    container_network: str
    port_range_start: int
    port_range_end: int
    nginx_config_dir: Path
    nginx_bin: str
    nginx_main_conf: str
    nginx_http_listen: str
    nginx_https_listen: str
    wildcard_ssl_cert: str
    wildcard_ssl_key: str
    default_from_email: str
    email_host: str
    email_port: int
    email_host_user: str
    email_host_password: str = field(repr=False)
    email_use_tls: bool
    admin_user: str
    admin_password: str = field(repr=False)
    admin_token: str = field(repr=False)
    plan_price_pence: int
    account_link_days: int
    suspend_after_days: int
    delete_after_days: int
    backup_root: Path
    backup_at: str
    backup_keep: int
    backup_keep_days: int
    backup_copy_to: str
    admin_notify_email: str
    # Slack-style webhook URLs are secrets: never in a repr, a log or a page.
    alert_webhooks: tuple[str, ...] = field(repr=False)
    alert_disk_percent: int
    health_history_days: int
    inventory_path: str
    max_stores_per_host: int
    health_wait_seconds: int
    health_alert_after: int
    health_interval_minutes: int
    disk_check_minutes: int
    sync_interval_minutes: int
    cleanup_at: str
    artifact_retention_days: int
    job_max_attempts: int
    job_retry_base_seconds: int
    run_timeout_seconds: int
    stop_grace_seconds: int
    ansible_mitogen: bool
    ansible_forks: int
    welcome_alert_after_minutes: int
    smtp_timeout_seconds: int
    server_threads: int
    db_busy_timeout_seconds: int
    # Labels every container, network and vhost we make; when unset, the one
    # generated into the database (models.open_database) fills it.
    installation_id: str
    trusted_proxies: tuple[str, ...]
    check_subdomain_per_minute: int
    checkout_per_minute: int
    # Customers' own domains (domains.py, certificates.py).
    acme_directory_url: str
    acme_email: str
    acme_ca_bundle: str
    acme_renew_days: int
    acme_challenge_upstream: str
    custom_domain_target: str
    # "address#port" (dnspython's way), or empty for the system's resolvers.
    dns_server: str
    # Not settings: where the project is, and the worker's pace.
    project_dir: Path = PROJECT_DIR
    worker_poll_seconds: float = 1.0

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
        env_file = env_file_path()
    env = read_env_file(env_file)
    env.update(os.environ if environ is None else environ)
    values = {}
    for setting in SETTINGS:
        raw = env.get(setting.env, "").strip()
        if not raw:
            if setting.default is REQUIRED:
                raise ConfigError(f"{setting.env} is required but not set")
            values[setting.field] = setting.default
        else:
            values[setting.field] = setting.parse(setting.env, raw)
    if values["port_range_end"] < values["port_range_start"]:
        raise ConfigError(f"PORT_RANGE_END ({values['port_range_end']}) must not be below "
                          f"PORT_RANGE_START ({values['port_range_start']})")
    values["data_dir"] = values["data_dir"].resolve()
    values["default_from_email"] = values["default_from_email"] or \
        f"eBuilder <noreply@{values['base_domain']}>"
    return Config(**values)
