"""Every setting: its environment name, the Config field it sets, its default,
its parser and what it means. The one place a default is written; the README's
table is printed from here (`provisioner settings`)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ConfigError(Exception):
    """A missing or invalid setting; its message is one line naming it."""


Parser = Callable[[str, str], object]


def integer(low: int = 0, high: int = 65535) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value
    return parse


def boolean(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def text(name: str, raw: str) -> str:
    return raw


def path(name: str, raw: str) -> Path:
    return Path(raw)


def url(name: str, raw: str) -> str:
    return raw.rstrip("/")


def lower(name: str, raw: str) -> str:
    return raw.lower()


def prefixed(*prefixes: str) -> Parser:
    def parse(name: str, raw: str) -> str:
        if not raw.startswith(prefixes):
            raise ConfigError(f"{name} must start with {' or '.join(prefixes)}")
        return raw
    return parse


def time_of_day(name: str, raw: str) -> str:
    hours, _, minutes = raw.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60
            and len(minutes) == 2):
        raise ConfigError(f"{name} must be HH:MM, got {raw!r}")
    return f"{int(hours):02d}:{minutes}"


def networks(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDR networks."""
    values = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            values.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not an IP address or network") from None
    return tuple(values)


def time_or_off(name: str, raw: str) -> str:
    """HH:MM, or "off" for a schedule that is not wanted."""
    return "off" if raw.strip().lower() == "off" else time_of_day(name, raw)


def webhook_targets(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs, each optionally `slack:`-prefixed (Slack's payload)."""
    values = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        address = part.removeprefix("slack:")
        if not address.startswith(("http://", "https://")) or " " in address:
            raise ConfigError(f"{name}: {part!r} is not an http(s) URL "
                              "(optionally prefixed slack:)")
        values.append(part)
    return tuple(values)


_INSTALLATION_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{2,62}")


def installation_id(name: str, raw: str) -> str:
    if not _INSTALLATION_ID.fullmatch(raw):
        raise ConfigError(f"{name} must be 3-63 of a-z, 0-9, '.', '_', '-', "
                          f"starting with a letter or digit, got {raw!r}")
    return raw


def https_url(name: str, raw: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", raw):
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return raw


def origin(name: str, raw: str) -> str:
    """scheme://host[:port], nothing after it (nginx passes the request's own path)."""
    value = raw.rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\]"
                        r"(:[0-9]{1,5})?", value):
        raise ConfigError(f"{name} must be scheme://host[:port] with no path, got {raw!r}")
    return value


def dns_server(name: str, raw: str) -> str:
    """An IP address, optionally with a port (`127.0.0.1:8053`, `[::1]:53`)."""
    host, port = raw, "53"
    if raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{name} must be an IP address, optionally with :port, "
                          f"got {raw!r}") from None
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{name}: bad port in {raw!r}")
    return f"{host}#{port}"


REQUIRED = object()


@dataclass(frozen=True)
class Setting:
    """One setting: its environment name, the Config field, its default and meaning."""

    env: str
    field: str
    default: object
    parse: Parser
    help: str
    # How the README shows the default, when the value itself would mislead.
    shown: str | None = None

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is REQUIRED:
            return "required"
        if self.default in ("", ()):
            return "—"
        return f"`{self.default}`"


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("STRIPE_WEBHOOK_SECRET", "stripe_webhook_secret", REQUIRED, prefixed("whsec_"),
      "`whsec_…` of the webhook endpoint"),
    S("BASE_DOMAIN", "base_domain", REQUIRED, lower, "stores live at `<subdomain>.<BASE_DOMAIN>`"),
    S("STRIPE_SECRET_KEY", "stripe_secret_key", "", prefixed("sk_", "rk_"),
      "needed by `/api/create-checkout/` and to re-read unknown customers"),
    S("STRIPE_PRICE_ID", "stripe_price_id", "", text,
      "the one plan's Stripe Price when there is no `PLANS_FILE`"),
    S("PLANS_FILE", "plans_file", "", text,
      "TOML file of the plans: Stripe Price, monthly price, container limits, trial "
      "(docs/plans.md)", shown="one plan from `STRIPE_PRICE_ID`"),
    S("TRIAL_DAYS", "trial_days", 0, integer(0, 730),
      "free trial of the one plan when there is no `PLANS_FILE`"),
    S("STRIPE_API_BASE", "stripe_api_base", "", url, "point the Stripe client at a local fake",
      shown="Stripe"),
    S("STRIPE_WEBHOOK_TOLERANCE", "stripe_webhook_tolerance", 300, integer(1, 86400),
      "seconds a webhook's signature stays valid"),
    S("PROVISIONER_PUBLIC_URL", "public_url", "http://127.0.0.1:8000", url,
      "this service's URL, for Checkout's success/cancel pages"),
    S("PROVISIONER_DATA_DIR", "data_dir", Path("/var/lib/ebuilder-provisioner"), path,
      "SQLite file, email outbox, ansible run artifacts (kept 0700)"),
    S("DATABASE_URL", "database_url", "", text,
      "`sqlite:////path` or `postgresql://user:pw@host/db`", shown="SQLite under the data dir"),
    S("EBUILDER_IMAGE", "ebuilder_image", "ebuilder-standin:latest", text, "the store image"),
    S("CUSTOMER_DATA_ROOT", "customer_data_root", Path("/srv/ebuilder/customers"), path,
      "per-store data dirs (`<id>/db,media,logs`) on each Docker host"),
    S("CONTAINER_NETWORK", "container_network", "ebuilder", text, "Docker network of the stores"),
    S("PORT_RANGE_START", "port_range_start", 9000, integer(1024),
      "first loopback port given to stores"),
    S("PORT_RANGE_END", "port_range_end", 9999, integer(1024), "last loopback port"),
    S("NGINX_CONFIG_DIR", "nginx_config_dir", Path("/etc/nginx/conf.d"), path,
      "where vhosts are written"),
    S("NGINX_BIN", "nginx_bin", "nginx", text, "the nginx binary"),
    S("NGINX_MAIN_CONF", "nginx_main_conf", "", text,
      "main config for `nginx -c` (test and reload); empty: nginx's own"),
    S("NGINX_HTTP_LISTEN", "nginx_http_listen", "80", text, "port or `address:port`"),
    S("NGINX_HTTPS_LISTEN", "nginx_https_listen", "443", text, "port or `address:port`"),
    S("WILDCARD_SSL_CERT", "wildcard_ssl_cert", "/etc/ssl/certs/wildcard.pem", text,
      "certificate for `*.<BASE_DOMAIN>`"),
    S("WILDCARD_SSL_KEY", "wildcard_ssl_key", "/etc/ssl/private/wildcard.key", text,
      "its key"),
    S("DEFAULT_FROM_EMAIL", "default_from_email", "", text, "sender of every email",
      shown="`eBuilder <noreply@BASE_DOMAIN>`"),
    S("EMAIL_HOST", "email_host", "", text,
      "SMTP server; without it, `.eml` files go to `<data dir>/outbox`", shown="outbox"),
    S("EMAIL_PORT", "email_port", 25, integer(1), "SMTP port"),
    S("EMAIL_HOST_USER", "email_host_user", "", text, "SMTP login"),
    S("EMAIL_HOST_PASSWORD", "email_host_password", "", text, "SMTP password"),
    S("EMAIL_USE_TLS", "email_use_tls", False, boolean, "STARTTLS to the SMTP server"),
    S("PROVISIONER_ADMIN_USER", "admin_user", "admin", text, "admin user (HTTP Basic)"),
    S("PROVISIONER_ADMIN_PASSWORD", "admin_password", "", text,
      "admin password; without it and a token nobody gets in"),
    S("PROVISIONER_ADMIN_TOKEN", "admin_token", "", text, "bearer token for scripts"),
    S("PLAN_PRICE_PENCE", "plan_price_pence", 1200, integer(0, 10_000_000),
      "monthly price of the one plan when there is no `PLANS_FILE`"),
    S("ACCOUNT_LINK_DAYS", "account_link_days", 14, integer(1, 365),
      "how long the signed link to a customer's account page in their emails stays valid"),
    S("SUSPEND_AFTER_DAYS", "suspend_after_days", 7, integer(0, 365),
      "grace of a past-due store before suspension"),
    S("DELETE_AFTER_DAYS", "delete_after_days", 30, integer(0, 3650),
      "a cancelled store is archived and destroyed this long after it ended"),
    S("BACKUP_ROOT", "backup_root", Path("/srv/ebuilder/backups"), path,
      "where backups and the archives of destroyed stores go (on the store's Docker host)"),
    S("BACKUP_AT", "backup_at", "02:30", time_or_off,
      "daily backup of every running store inside `serve` (HH:MM, or `off`)"),
    S("BACKUP_KEEP", "backup_keep", 7, integer(1, 1000),
      "backups kept per store (the newest); older ones are deleted"),
    S("BACKUP_KEEP_DAYS", "backup_keep_days", 30, integer(1, 3650),
      "backups older than this are deleted (the newest good one is always kept)"),
    S("BACKUP_COPY_TO", "backup_copy_to", "", text,
      "second location of each backup: a path on the store's host or an rsync target "
      "`user@host:/path`; empty: none"),
    S("ADMIN_NOTIFY_EMAIL", "admin_notify_email", "", text,
      "who hears about stores that need attention or stay unhealthy"),
    S("ALERT_WEBHOOKS", "alert_webhooks", (), webhook_targets,
      "comma-separated URLs that get each alert (and its resolution) as JSON; "
      "`slack:https://...` sends Slack's format"),
    S("ALERT_DISK_PERCENT", "alert_disk_percent", 90, integer(1, 100),
      "a store using this share of its plan's disk raises a disk alert"),
    S("HEALTH_HISTORY_DAYS", "health_history_days", 90, integer(1, 3650),
      "health history (uptime) kept this long"),
    S("PROVISIONER_INVENTORY", "inventory_path", "", text,
      "the Docker hosts stores are placed on", shown="`inventory/hosts.yml`"),
    S("MAX_STORES_PER_HOST", "max_stores_per_host", 100, integer(1, 100_000),
      "default capacity of a Docker host"),
    S("HEALTH_WAIT_SECONDS", "health_wait_seconds", 60, integer(1, 3600),
      "how long a (re)started store may take to answer `/health/`"),
    S("HEALTH_ALERT_AFTER", "health_alert_after", 3, integer(1, 100),
      "failed checks in a row before the admin is emailed"),
    S("HEALTH_INTERVAL_MINUTES", "health_interval_minutes", 5, integer(1, 1440),
      "health sweep interval inside `serve`"),
    S("DISK_CHECK_MINUTES", "disk_check_minutes", 60, integer(5, 10080),
      "how often the health sweep also measures each store's data dir against its plan's "
      "disk (`du`, once per Docker host)"),
    S("SYNC_INTERVAL_MINUTES", "sync_interval_minutes", 60, integer(1, 10080),
      "sync interval inside `serve`"),
    S("CLEANUP_AT", "cleanup_at", "03:30", time_of_day, "daily cleanup time inside `serve`"),
    S("ARTIFACT_RETENTION_DAYS", "artifact_retention_days", 30, integer(1, 3650),
      "ansible run dirs and log entries kept this long"),
    S("JOB_MAX_ATTEMPTS", "job_max_attempts", 8, integer(1, 100),
      "tries of a failing job before it is `failed` (8: about 20 minutes of retries; "
      "`sync` and Retry try again later)"),
    S("JOB_RETRY_BASE_SECONDS", "job_retry_base_seconds", 5, integer(0, 3600),
      "first retry delay; doubles each time, at most an hour"),
    S("JOB_RUN_TIMEOUT_SECONDS", "run_timeout_seconds", 900, integer(10, 86400),
      "an ansible run still going after this long is ended; its jobs retry and the admin "
      "is alerted"),
    S("ANSIBLE_MITOGEN", "ansible_mitogen", True, boolean,
      "run playbooks with Mitogen's strategy (module calls in kept-alive interpreters, about "
      "twice as fast); false: Ansible's own `linear`"),
    S("ANSIBLE_FORKS", "ansible_forks", 4, integer(1, 500),
      "stores an ansible run works on at once, each in a forked copy of ansible-playbook "
      "(~60 MB of RSS, much of it shared). On 2 CPUs a burst of 20 signups took as long "
      "with 2, 4 or 10 (49-53 s), at a peak of 491, 555, 914 MB; raise it for slow (SSH) "
      "Docker hosts"),
    S("STOP_GRACE_SECONDS", "stop_grace_seconds", 20, integer(0, 3600),
      "on SIGTERM, how long a running playbook may finish before it is cancelled"),
    S("WELCOME_ALERT_AFTER_MINUTES", "welcome_alert_after_minutes", 30, integer(1, 10080),
      "a welcome email still not sent after this long alerts the admin (it keeps trying)"),
    S("SMTP_TIMEOUT_SECONDS", "smtp_timeout_seconds", 20, integer(1, 600),
      "connect and reply timeout of each SMTP exchange"),
    S("SERVER_THREADS", "server_threads", 32, integer(4, 1024),
      "HTTP worker threads of `serve` (slow clients hold one each)"),
    S("DB_BUSY_TIMEOUT_SECONDS", "db_busy_timeout_seconds", 10, integer(1, 600),
      "how long a write waits for another writer before giving up (webhooks then answer "
      "503 and Stripe retries)"),
    S("INSTALLATION_ID", "installation_id", "", installation_id,
      "labels every container, network and vhost this installation makes",
      shown="generated once, kept in the DB"),
    S("TRUSTED_PROXIES", "trusted_proxies", (), networks,
      "comma-separated addresses/networks of reverse proxies whose `X-Forwarded-For` is "
      "believed"),
    S("CHECK_SUBDOMAIN_PER_MINUTE", "check_subdomain_per_minute", 60, integer(1, 100_000),
      "per client address, for `/api/check-subdomain/`"),
    S("CHECKOUT_PER_MINUTE", "checkout_per_minute", 10, integer(1, 100_000),
      "per client address, for `/api/create-checkout/`"),
    S("ACME_DIRECTORY_URL", "acme_directory_url",
      "https://acme-v02.api.letsencrypt.org/directory", https_url,
      "the ACME server that issues certificates for customers' own domains (HTTP-01)",
      shown="Let's Encrypt"),
    S("ACME_EMAIL", "acme_email", "", text,
      "contact address of the ACME account (expiry and policy notices); empty: none"),
    S("ACME_CA_BUNDLE", "acme_ca_bundle", "", text,
      "CA bundle trusted for the ACME server's own HTTPS; empty: the system's"),
    S("ACME_RENEW_DAYS", "acme_renew_days", 30, integer(1, 89),
      "a custom domain's certificate is renewed this many days before it expires"),
    S("ACME_CHALLENGE_UPSTREAM", "acme_challenge_upstream", "", origin,
      "`http(s)://host:port` of this service as the nginx hosts reach it: they pass "
      "`/.well-known/acme-challenge/` requests to it", shown="`PROVISIONER_PUBLIC_URL`"),
    S("CUSTOM_DOMAIN_TARGET", "custom_domain_target", "", lower,
      "what customers point their own domains at: a host name (CNAME) or comma-separated IP "
      "addresses (A/AAAA)", shown="the store's `<subdomain>.<BASE_DOMAIN>`"),
    S("DNS_SERVER", "dns_server", "", dns_server,
      "`address` or `address:port` of the DNS server the custom-domain check asks",
      shown="the system's resolvers"),
)


def settings_table() -> str:
    """The README's table of settings, made from SETTINGS."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.env}` | {s.default_text()} | {s.help} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"
