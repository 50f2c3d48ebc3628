"""The plans customers can buy: each a Stripe Price, a monthly price and the limits of
its store's container. One place for every plan fact: the signup page, Checkout, the
role's limits and the revenue figures all read them here.

Without PLANS_FILE there is one plan, from STRIPE_PRICE_ID and PLAN_PRICE_PENCE. A
PLANS_FILE is TOML, one `[[plan]]` table per plan (docs/plans.md):

    [[plan]]
    key = "starter"            # what the signup form sends
    name = "Starter"
    price_id = "price_..."     # the Stripe Price
    price_pence = 1200         # a month, in the currency's minor unit
    memory_mb = 512
    cpus = 0.5
    pids_limit = 256
    disk_mb = 5120
    trial_days = 0
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from provisioner.config import Config, ConfigError

log = logging.getLogger(__name__)
_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CURRENCY = re.compile(r"[a-z]{3}")
# Limits of the plan made from STRIPE_PRICE_ID when there is no PLANS_FILE: one store
# cannot take more than this from the others on its host.
DEFAULT_LIMITS = {"memory_mb": 1024, "cpus": 1.0, "pids_limit": 512, "disk_mb": 10240}
CURRENCY_SIGNS = {"gbp": "£", "eur": "€", "usd": "$"}


@dataclass(frozen=True)
class Plan:
    key: str
    name: str
    price_id: str
    price_pence: int
    currency: str = "gbp"
    # 0: no limit.
    memory_mb: int = 0
    cpus: float = 0.0
    pids_limit: int = 0
    # Not enforceable on the bind-mounted data dirs: a downgrade below what a store
    # uses is refused, and the admin page shows the usage against it.
    disk_mb: int = 0
    trial_days: int = 0
    description: str = ""

    @property
    def price_text(self) -> str:
        sign = CURRENCY_SIGNS.get(self.currency, "")
        amount = f"{self.price_pence / 100:.2f}".removesuffix(".00")
        return f"{sign}{amount}" if sign else f"{amount} {self.currency.upper()}"

    def limits(self) -> dict[str, int | float]:
        return {"memory_mb": self.memory_mb, "cpus": self.cpus,
                "pids_limit": self.pids_limit, "disk_mb": self.disk_mb}

    def limits_text(self) -> str:
        parts = [f"{self.memory_mb} MB memory" if self.memory_mb else "memory unlimited",
                 f"{self.cpus:g} CPU" if self.cpus else "CPU unlimited",
                 f"{self.pids_limit} processes" if self.pids_limit else "",
                 (f"{self.disk_mb / 1024:g} GB disk" if self.disk_mb >= 1024 else
                  f"{self.disk_mb} MB disk") if self.disk_mb else ""]
        return ", ".join(p for p in parts if p)

    def as_dict(self) -> dict:
        return {**asdict(self), "price_text": self.price_text}


_FIELDS = {"key": str, "name": str, "price_id": str, "price_pence": int, "currency": str,
           "memory_mb": int, "cpus": (int, float), "pids_limit": int, "disk_mb": int,
           "trial_days": int, "description": str}
_REQUIRED = ("key", "name", "price_id", "price_pence")


def _plan(where: str, raw: dict) -> Plan:
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
    for name in _REQUIRED:
        if name not in raw:
            raise ConfigError(f"{where}: {name} is required")
    for name, kind in _FIELDS.items():
        if name in raw and (not isinstance(raw[name], kind) or isinstance(raw[name], bool)):
            raise ConfigError(f"{where}: {name} has the wrong type")
        if name in raw and kind is not str and raw[name] < 0:
            raise ConfigError(f"{where}: {name} must not be negative")
    if not _KEY.fullmatch(raw["key"]):
        raise ConfigError(f"{where}: key must be 1-32 of a-z, 0-9, '_', '-'")
    if not raw["price_id"].startswith(("price_", "plan_")):
        raise ConfigError(f"{where}: price_id must be a Stripe Price id (price_...)")
    if not _CURRENCY.fullmatch(raw.get("currency", "gbp")):
        raise ConfigError(f"{where}: currency must be three lower-case letters")
    if 0 < raw.get("memory_mb", 0) < 16:
        raise ConfigError(f"{where}: memory_mb must be 0 (no limit) or at least 16")
    if raw.get("trial_days", 0) > 730:
        raise ConfigError(f"{where}: trial_days must be at most 730")
    return Plan(**{**raw, "cpus": float(raw.get("cpus", 0))})


def parse(text: str, where: str = "PLANS_FILE") -> tuple[Plan, ...]:
    """Plans from TOML; a ConfigError names the file, the plan and the field."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    raw_plans = document.get("plan")
    if not isinstance(raw_plans, list) or not raw_plans:
        raise ConfigError(f"{where}: needs at least one [[plan]] table")
    found = tuple(_plan(f"{where}: plan {n}", raw) for n, raw in enumerate(raw_plans, 1))
    for field in ("key", "price_id"):
        values = [getattr(p, field) for p in found]
        duplicate = next((v for v in values if values.count(v) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"{where}: two plans have {field} {duplicate!r}")
    return found


_cache: dict[tuple, tuple[Plan, ...]] = {}
# The last file that parsed, by path: an edit that breaks it while the service runs
# is logged and the plans it had stay (start-up and `settings --check` refuse it).
_last_good: dict[str, tuple[Plan, ...]] = {}
_reported: set[tuple] = set()


def all_plans(config: Config) -> tuple[Plan, ...]:
    """The plans, in the file's order (the first is the default); re-read when the
    file changes."""
    if not config.plans_file:
        return (Plan(key="standard", name="eBuilder store", price_id=config.stripe_price_id
                     or "price_unset", price_pence=config.plan_price_pence,
                     trial_days=config.trial_days, **DEFAULT_LIMITS),)
    path = Path(config.plans_file)
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in _cache:
            found = parse(path.read_text(), where=str(path))
            _cache.clear()
            _cache[key] = _last_good[str(path)] = found
        return _cache[key]
    except OSError as exc:
        problem = ConfigError(f"PLANS_FILE {path}: {exc.strerror}")
        key = (str(path), "unreadable")
    except ConfigError as exc:
        problem = exc
    if str(path) not in _last_good:
        raise problem from None
    if key not in _reported:
        _reported.add(key)
        log.error("%s; the plans read before stay in use until it is fixed", problem)
    return _last_good[str(path)]


def default(config: Config) -> Plan:
    return all_plans(config)[0]


def by_key(config: Config, key: object) -> Plan:
    """The plan the signup form chose; no choice is the default plan."""
    if key in (None, ""):
        return default(config)
    for plan in all_plans(config):
        if plan.key == key:
            return plan
    raise ValueError(f"unknown plan {key!r}")


def by_price(config: Config, price_id: str | None) -> Plan | None:
    for plan in all_plans(config):
        if plan.price_id == price_id:
            return plan
    return None
