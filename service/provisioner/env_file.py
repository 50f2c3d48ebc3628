"""The settings file the systemd units name (/etc/ebuilder-provisioner.env), read the way
systemd reads it and checked before a restart finds its mistakes (`provisioner
check-config`).

systemd and `provisioner` commands both read this file, each with its own reader
(config.read_env_file); a value the two read differently means the service and a
sysadmin's command run with different settings, so that is a problem too. The settings
are checked by settings.py's own parsers and config.load_config, as at start-up; no
database is opened. Nothing printed ever holds the value of a secret setting.

`python -m provisioner.env_file` prints deploy/ebuilder-provisioner.env.example, made
from settings.SETTINGS (a test keeps the two equal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import ipaddress
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from provisioner.ansible.runner import PASSED_ENV, PASSED_ENV_PREFIXES
from provisioner.config import (
    PROJECT_DIR,
    SYSTEM_ENV_FILE,
    Config,
    ConfigError,
    env_file_path,
    load_config,
    read_env_file,
)
from provisioner.redaction import redact
from provisioner.settings import REQUIRED, SETTINGS

NAMES = {s.env: s for s in SETTINGS}
# Hidden from Config's repr (config.py): never printed here either.
SECRETS = frozenset(s.env for s in SETTINGS if s.field in
                    {f.name for f in dataclasses.fields(Config) if not f.repr})
# Read from the process environment by something other than the provisioner's settings:
# ansible-playbook (what ansible/runner.py passes on to it), glibc (web/server.py),
# Python's HTTP clients and OpenSSL.
OTHER_VARIABLES = PASSED_ENV | {
    "MALLOC_ARENA_MAX", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
    "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"}
# Files on this machine: relative, they would be found from the units' WorkingDirectory
# but from a sysadmin's own directory by a command.
LOCAL_PATHS = ("PROVISIONER_DATA_DIR", "PLANS_FILE", "PROVISIONER_INVENTORY", "ACME_CA_BUNDLE")

# systemd's src/basic/env-file.c (parse_env_file_internal), state by state.
COMMENTS, WHITESPACE, NEWLINE, SHELL_NEED_ESCAPE = "#;", " \t\n\r", "\n\r", '"\\`$'
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPORT = re.compile(r"export\s+[A-Za-z_][A-Za-z0-9_]*")
_LINE_OF = re.compile(r":(\d+): expected KEY=VALUE$")


@dataclass(frozen=True)
class Assignment:
    """KEY=VALUE as systemd reads it, with the line it starts on."""

    line: int
    key: str
    value: str


@dataclass
class Parsed:
    """What systemd makes of the file, and the lines it would ignore or misread."""

    assignments: list[Assignment] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    spanned: set[int] = field(default_factory=set)  # lines inside a value said to span

    def values(self) -> dict[str, str]:
        return {a.key: a.value for a in self.assignments}  # the last one wins, as in systemd

    def add(self, line: int, key: str, value: str, multiline: bool) -> None:
        if _EXPORT.fullmatch(key):
            self.problems.append((line, "`export` is shell syntax: systemd ignores this "
                                        "line (write KEY=VALUE)"))
        elif not _NAME.fullmatch(key):
            self.problems.append((line, "the name before `=` is not a variable name "
                                        "(letters, digits, `_`): systemd ignores this line"))
        elif any("\udc80" <= c <= "\udcff" for c in key + value):  # surrogateescape
            self.problems.append((line, f"{key}: not UTF-8: systemd refuses to start the unit"))
        else:
            if multiline:
                self.problems.append((line, f"{key}: the value runs onto the next line (a "
                                            "quote left open, or a trailing `\\`)"))
            self.assignments.append(Assignment(line, key, value))


def parse(text: str) -> Parsed:
    """KEY=VALUE assignments as systemd reads them (quotes, backslashes, `#` and `;`
    comment lines, trailing blanks), each with the line it starts on."""
    parsed = Parsed()
    state, key, value, line, start, opened, multiline = "pre_key", [], [], 1, 1, 1, False
    key_blank = value_blank = None  # where trailing blanks of the key / value began

    def push(chomp: bool) -> None:
        name = "".join(key if key_blank is None else key[:key_blank])
        text = "".join(value if not chomp or value_blank is None else value[:value_blank])
        parsed.add(start, name, text, multiline)
        if multiline:
            parsed.spanned.update(range(start, line + 1))

    for c in text:
        if state == "pre_key":
            if c in COMMENTS:
                state = "comment"
                if c == ";":
                    parsed.problems.append((line, "`;` starts a comment for systemd, not "
                                                  "for `provisioner` commands: use `#`"))
            elif c not in WHITESPACE:
                state, key, key_blank, start, multiline = "key", [c], None, line, False
        elif state == "key":
            if c in NEWLINE:
                parsed.problems.append((start, "no `=` on this line: systemd ignores it"))
                state = "pre_key"
            elif c == "=":
                state, value, value_blank = "pre_value", [], None
            else:
                key_blank = None if c not in WHITESPACE else \
                    (len(key) if key_blank is None else key_blank)
                key.append(c)
        elif state == "pre_value":
            if c in NEWLINE:
                push(chomp=False)
                state = "pre_key"
            elif c in "'\"":
                state, opened = ("single" if c == "'" else "double"), line
            elif c == "\\":
                state = "value_escape"
            elif c not in WHITESPACE:
                state = "value"
                value.append(c)
        elif state == "value":
            if c in NEWLINE:
                push(chomp=True)
                state = "pre_key"
            elif c == "\\":
                state, value_blank = "value_escape", None
            else:
                value_blank = None if c not in WHITESPACE else \
                    (len(value) if value_blank is None else value_blank)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if c in NEWLINE:
                multiline = True  # a continuation line: eaten whole
            else:
                value.append(c)
        elif state in ("single", "double"):
            if c == ("'" if state == "single" else '"'):
                state = "pre_value"
            elif c == "\\" and state == "double":
                state = "double_escape"
            else:
                multiline = multiline or c == "\n"
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in SHELL_NEED_ESCAPE:
                value.append(c)
            elif c == "\n":
                multiline = True
            else:
                value += ["\\", c]
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in NEWLINE:
                state = "pre_key"
        elif state == "comment_escape":
            if c in NEWLINE:
                parsed.problems.append((line, "a comment ending in `\\`: systemd before "
                                              "version 254 reads the next line as comment too"))
                state = "pre_key"
            else:
                state = "comment"
        if c == "\n":
            line += 1
    if state in ("single", "double", "double_escape"):
        parsed.problems.append((opened, "a quote opened here is never closed"))
        parsed.spanned.update(range(opened, line + 1))
        multiline = False  # said already
    if state == "key":
        parsed.problems.append((start, "no `=` on this line: systemd ignores it"))
    elif state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push(chomp=state == "value")
    return parsed


@dataclass
class _Report:
    path: Path
    problems: list[tuple[int, str]] = field(default_factory=list)

    def add(self, text: str, line: int | None = None) -> None:
        self.problems.append((line or 0, text))

    def lines(self, secrets: list[str]) -> list[str]:
        """The file's own problems first, then each line's in order; no secret in them."""
        return [redact(f"{self.path}:{line}: {text}" if line else f"{self.path}: {text}",
                       secrets) for line, text in sorted(self.problems, key=lambda p: p[0])]


def check(path: Path, units_file: Path = SYSTEM_ENV_FILE) -> list[str]:
    """Every problem of the settings file at `path`, one line each ("path:line: ..."); an
    empty list when the units would start with it."""
    report = _Report(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        report.add(f"cannot read it ({exc.strerror}); the settings file is --env-file, "
                   f"else PROVISIONER_ENV_FILE, ./.env, {PROJECT_DIR}/.env "
                   f"or {SYSTEM_ENV_FILE}")
        return report.lines([])
    _file(report, path, units_file)
    parsed = parse(raw.decode("utf-8", "surrogateescape"))
    values = parsed.values()
    lines = {a.key: a.line for a in parsed.assignments}
    for line, text in parsed.problems:
        report.add(text, line)
    for a in parsed.assignments:
        if re.search(r"\s#", a.value):
            report.add(f"{a.key}: `#` after a value is part of the value: put comments on "
                       "lines of their own", a.line)
    _names(report, parsed)
    _service_reader(report, path, parsed, {line for line, _ in parsed.problems}
                    | parsed.spanned)
    _relative_paths(report, values, lines)
    config = _settings(report, values, lines)
    if config is not None:
        _local_files(report, config, lines)
    return report.lines(_secret_values(values))


def _file(report: _Report, path: Path, units_file: Path) -> None:
    """The file holds secrets, and the units run as root what it names (NGINX_BIN)."""
    stat = path.stat()
    if stat.st_mode & 0o077:
        report.add(f"mode {stat.st_mode & 0o777:04o}: group or others may read it and it "
                   f"holds secrets: chmod 600 {path}")
    if stat.st_uid not in (0, os.getuid()):
        report.add(f"owned by uid {stat.st_uid}: only root (the units' user) should be able "
                   f"to change it: chown root:root {path}")
    here = env_file_path()
    if units_file.is_file() and here.resolve() != units_file.resolve():
        report.add(f"`provisioner` commands run from here read {here}, not {units_file} "
                   "(the units' file): remove it, or set PROVISIONER_ENV_FILE")


def _names(report: _Report, parsed: Parsed) -> None:
    """Names that are no setting (a typo is named with the setting meant), and repeats."""
    first: dict[str, int] = {}
    for a in parsed.assignments:
        if a.key in first:
            report.add(f"{a.key} again (first on line {first[a.key]}): the last one wins",
                       a.line)
        first.setdefault(a.key, a.line)
        if a.key in NAMES:
            continue
        if a.key == "PROVISIONER_ENV_FILE":
            report.add("PROVISIONER_ENV_FILE names this file: set it in the unit or the "
                       "shell, not inside it", a.line)
            continue
        close = difflib.get_close_matches(a.key.upper(), NAMES, n=1, cutoff=0.8)
        if close:
            report.add(f"{a.key} is not a setting: did you mean {close[0]}?", a.line)
        elif a.key not in OTHER_VARIABLES and not a.key.startswith(PASSED_ENV_PREFIXES):
            report.add(f"{a.key} is not a setting (`provisioner settings` lists them)", a.line)


def _service_reader(report: _Report, path: Path, parsed: Parsed, reported: set[int]) -> None:
    """`provisioner` commands read the file with config.read_env_file: a line it refuses
    stops them (and the service, which reads it too); a value it reads otherwise than
    systemd gives a command other settings than the service has."""
    try:
        theirs = read_env_file(path)
    except UnicodeDecodeError:
        report.add("not UTF-8: `provisioner` commands cannot read it")
        return
    except ConfigError as exc:
        found = _LINE_OF.search(str(exc))
        line = int(found.group(1)) if found else None
        if line not in reported:
            report.add("`provisioner` commands stop on this line (expected KEY=VALUE)", line)
        return
    last = {a.key: a for a in parsed.assignments}  # what each reader ends up with
    for a in last.values():
        if a.line not in reported and theirs.get(a.key) != a.value:
            report.add(f"{a.key}: systemd and `provisioner` commands read this value "
                       "differently: write it bare, or inside one pair of quotes, with no "
                       "backslash", a.line)


def _settings(report: _Report, values: dict[str, str], lines: dict[str, int]) -> Config | None:
    """Each setting through its own parser, then load_config as start-up runs it."""
    said, bad = set(), set()
    for setting in SETTINGS:
        raw = values.get(setting.env, "").strip()
        if raw:
            try:
                setting.parse(setting.env, raw)
            except ConfigError as exc:
                said.add(str(exc))
                bad.add(setting.env)
                report.add(str(exc), lines[setting.env])
        elif setting.default is REQUIRED:
            said.add(f"{setting.env} is required but not set")
            report.add(f"{setting.env} is required but not set", lines.get(setting.env))
    if any(NAMES[name].default is REQUIRED for name in bad):
        return None  # no default can stand in for it
    try:
        # The file's values alone, as the units start with them (os.devnull: no second
        # file), less those said to be bad (their defaults stand in, to check the rest).
        config = load_config({k: v for k, v in values.items() if k not in bad},
                             env_file=Path(os.devnull))
    except ConfigError as exc:
        if str(exc) not in said:
            report.add(str(exc))
        return None
    from provisioner import plans  # its start-up check of PLANS_FILE

    try:
        plans.all_plans(config)
    except ConfigError as exc:
        report.add(str(exc), lines.get("PLANS_FILE"))
    _behind_a_proxy(report, config, lines)
    database = _database(config.database_url)
    if database:
        report.add(database, lines.get("DATABASE_URL"))
    return config


def _behind_a_proxy(report: _Report, config: Config, lines: dict[str, int]) -> None:
    """`serve` speaks plain HTTP: an https URL means a proxy in front, and a proxy in
    front means customers cannot reach a loopback URL."""
    if config.public_url.startswith("https://") and not config.trusted_proxies:
        report.add("PROVISIONER_PUBLIC_URL is https (a proxy such as nginx is in front) but "
                   "TRUSTED_PROXIES is empty: every client would count as the proxy for "
                   "rate limits and login throttling", lines.get("PROVISIONER_PUBLIC_URL"))
    host = urlparse(config.public_url).hostname or ""
    with contextlib.suppress(ValueError):
        host = "localhost" if ipaddress.ip_address(host).is_loopback else host
    if config.trusted_proxies and host == "localhost":
        report.add("PROVISIONER_PUBLIC_URL is this machine's loopback address while a proxy "
                   "is in front (TRUSTED_PROXIES): the links in emails and Stripe's return "
                   "pages would lead nowhere; set it to the proxy's https:// URL",
                   lines.get("PROVISIONER_PUBLIC_URL"))


def _database(url: str) -> str | None:
    """What models.bind would refuse at start-up, without connecting."""
    if not url or url.startswith("sqlite"):
        return None
    if not url.startswith(("postgres://", "postgresql://")):
        return "DATABASE_URL must be sqlite:///path or postgresql://..."
    from provisioner.models import postgres_options

    try:
        postgres_options(url)
    except ConfigError as exc:
        return str(exc)
    if importlib.util.find_spec("psycopg2") is None:
        return ("DATABASE_URL names PostgreSQL but psycopg2 is not installed: "
                "pip install 'ebuilder-provisioner[postgres]'")
    return None


def _relative_paths(report: _Report, values: dict[str, str], lines: dict[str, int]) -> None:
    for name in LOCAL_PATHS:
        raw = values.get(name, "").strip()
        if raw and not Path(raw).is_absolute():
            report.add(f"{name} is a relative path: the units would look for it in their "
                       "WorkingDirectory, a command in its own directory: make it absolute",
                       lines[name])


def _local_files(report: _Report, config: Config, lines: dict[str, int]) -> None:
    """Files the service reads on this machine must be there."""
    if not config.inventory_file.is_file():
        report.add(f"the Docker hosts' inventory {config.inventory_file} is not a file "
                   "(PROVISIONER_INVENTORY)", lines.get("PROVISIONER_INVENTORY"))
    if config.acme_ca_bundle and not Path(config.acme_ca_bundle).is_file():
        report.add(f"ACME_CA_BUNDLE {config.acme_ca_bundle} is not a file",
                   lines["ACME_CA_BUNDLE"])
    if config.data_dir.exists() and not config.data_dir.is_dir():
        report.add(f"PROVISIONER_DATA_DIR {config.data_dir} is not a directory",
                   lines.get("PROVISIONER_DATA_DIR"))
    if not (config.playbooks_dir / "provision.yml").is_file():
        report.add(f"no playbooks in {config.playbooks_dir}: install the project from its "
                   "checkout with `pip install -e .`")


def _secret_values(values: dict[str, str]) -> list[str]:
    """The secrets' values, whole and in the pieces a message could quote (one webhook URL
    of ALERT_WEBHOOKS, the password of DATABASE_URL)."""
    found = []
    for name in SECRETS:
        raw = values.get(name, "")
        found += [raw, raw.strip(), *(part.strip() for part in raw.split(","))]
        with contextlib.suppress(ValueError):  # a malformed URL has no password to find
            found.append(urlparse(raw.strip()).password or "")
    return [v for v in found if v]


# --- The example file (deploy/ebuilder-provisioner.env.example) -----------------------

# What a production install sets, in this order: (setting, value, a note). An empty value
# leaves the setting to the operator (a required one then fails the check).
PRODUCTION = (
    ("BASE_DOMAIN", "", "e.g. stores.example.com"),
    ("PROVISIONER_PUBLIC_URL", "", "e.g. https://provisioner.stores.example.com, the name "
                                   "of deploy/nginx/ebuilder-provisioner.conf"),
    ("TRUSTED_PROXIES", "127.0.0.1", "127.0.0.1: the nginx of deploy/nginx/ on this machine"),
    ("ACME_CHALLENGE_UPSTREAM", "http://127.0.0.1:8000", "http://127.0.0.1:8000 while "
                                                         "nginx runs on this machine"),
    ("STRIPE_WEBHOOK_SECRET", "", "the endpoint https://<PUBLIC_URL's host>/api/webhook/stripe/"),
    ("STRIPE_SECRET_KEY", "", "sk_live_... or a restricted key rk_live_..."),
    ("STRIPE_PRICE_ID", "", "price_..., or a PLANS_FILE"),
    ("PLANS_FILE", "", "e.g. /etc/ebuilder-provisioner-plans.toml (deploy/plans.example.toml)"),
    ("EBUILDER_IMAGE", "", "e.g. registry.example.com/ebuilder:1.0 (the default is the "
                           "tests' stand-in)"),
    ("WILDCARD_SSL_CERT", "/etc/ssl/certs/wildcard.pem", ""),
    ("WILDCARD_SSL_KEY", "/etc/ssl/private/wildcard.key", ""),
    ("PROVISIONER_ADMIN_PASSWORD", "", "a long random one"),
    ("PROVISIONER_ADMIN_TOKEN", "", "a long random one"),
    ("ADMIN_NOTIFY_EMAIL", "", "e.g. ops@example.com"),
    ("DEFAULT_FROM_EMAIL", "", "e.g. eBuilder <noreply@stores.example.com>"),
    ("EMAIL_HOST", "", "e.g. smtp.example.com"),
    ("EMAIL_PORT", "587", ""),
    ("EMAIL_USE_TLS", "true", ""),
    ("EMAIL_HOST_USER", "", ""),
    ("EMAIL_HOST_PASSWORD", "", ""),
    ("ACME_EMAIL", "", "e.g. ops@example.com"),
    ("PROVISIONER_DATA_DIR", "/var/lib/ebuilder-provisioner", "the units' StateDirectory"),
    ("DATABASE_URL", "", "postgresql://... for workers on several machines "
                         "(docs/postgresql.md)"),
)

EXAMPLE_HEAD = """\
# /etc/ebuilder-provisioner.env: the eBuilder provisioner's settings, read by its systemd
# units (EnvironmentFile=) and by every `provisioner` command on this machine.
# It holds secrets: owned by root, mode 0600 (docs/deployment.md):
#   cp deploy/ebuilder-provisioner.env.example /etc/ebuilder-provisioner.env
#   chown root:root /etc/ebuilder-provisioner.env && chmod 600 /etc/ebuilder-provisioner.env
#   $EDITOR /etc/ebuilder-provisioner.env && provisioner check-config
# Syntax (systemd's): KEY=VALUE, one a line; a value may have spaces and needs no quotes;
# comments on lines of their own, starting with `#`; no `export`, no backslashes.
# Made from service/provisioner/settings.py, where each setting is defined:
#   python -m provisioner.env_file > deploy/ebuilder-provisioner.env.example
"""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 86, initial_indent="# ",
                         subsequent_indent="# ", break_on_hyphens=False,
                         break_long_words=False)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _default(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def example_text() -> str:
    """The example env file: what production sets, then every other setting with its
    default, each with its meaning from settings.SETTINGS."""
    out = [EXAMPLE_HEAD, "# ===== What a production install sets (empty: the default; a "
                         "required one must be filled)", ""]
    for name, value, note in PRODUCTION:
        setting = NAMES[name]
        default = "Required." if setting.default is REQUIRED else \
            "" if setting.default_text() == "—" else f"Default: {setting.default_text()}."
        out += _comment(f"{_capital(setting.help)}. {default}") + _comment(note)
        out += [f"{name}={value}", ""]
    out += ["# ===== Everything else: its default unless set here", ""]
    chosen = {name for name, _, _ in PRODUCTION}
    for setting in SETTINGS:
        if setting.env in chosen:
            continue
        if setting.shown is None:
            out += _comment(f"{_capital(setting.help)}.")
            out += [f"#{setting.env}={_default(setting.default)}", ""]
        else:
            out += _comment(f"{_capital(setting.help)}. Default: {setting.shown}.")
            out += [f"#{setting.env}=", ""]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(example_text(), end="")
