"""What a store's subdomain may be: one lowercase DNS label, not reserved, not taken."""

from __future__ import annotations

import re
from datetime import timedelta

from pony.orm import exists, flush

from provisioner.models import Instance, SubdomainHold, utcnow
from provisioner.stripe_shapes import timestamp

# Names that belong to us or that customers would mistake for us.
RESERVED = frozenset({
    "www", "admin", "api", "mail", "smtp", "imap", "pop", "ftp", "provisioner", "status",
    "billing", "stripe", "webhook", "webhooks", "dashboard", "app", "static", "media",
    "assets", "cdn", "support", "help", "docs", "blog", "ns1", "ns2", "localhost",
    "root", "test", "staging", "dev",
})
# A DNS label (RFC 1035/1123), lowercase ASCII, 3..63 long, no leading/trailing
# hyphen, and no "xn--"-style punycode.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{1,61})[a-z0-9]")


class InvalidSubdomain(ValueError):
    """The reason a name cannot be a store's subdomain."""


class SubdomainTaken(InvalidSubdomain):
    """A well-formed name that a live store already has."""


def normalise(raw: object) -> str:
    if not isinstance(raw, str):
        raise InvalidSubdomain("subdomain must be a string")
    return raw.strip().lower()


def validate_format(name: str) -> str:
    """Return `name` if it is a usable label; raise InvalidSubdomain saying why not."""
    if not name:
        raise InvalidSubdomain("subdomain is required")
    if len(name) > 63:
        raise InvalidSubdomain("subdomain must be at most 63 characters")
    if len(name) < 3:
        raise InvalidSubdomain("subdomain must be at least 3 characters")
    if not name.isascii() or _LABEL.fullmatch(name) is None:
        raise InvalidSubdomain(
            "subdomain may contain only a-z, 0-9 and hyphens, and must start and end "
            "with a letter or digit"
        )
    if name[2:4] == "--":
        raise InvalidSubdomain("subdomain must not have hyphens in 3rd and 4th position")
    if name in RESERVED:
        raise InvalidSubdomain(f"'{name}' is reserved")
    return name


def holder(name: str) -> Instance | None:
    """Needs a db_session: the live store that has this name."""
    return Instance.get(subdomain=name, live=True)


def is_held(name: str, except_session: str | None = None) -> bool:
    """Needs a db_session: an open checkout (not `except_session`) was promised this name."""
    return exists(h for h in SubdomainHold if h.subdomain == name and h.expires_at > utcnow()
                  and h.checkout_session_id != except_session)


def check_available(raw: object, email: str | None = None) -> str:
    """Needs a db_session. The normalised name, or InvalidSubdomain.

    A cancelled store's own customer (same email) may take its name back.
    """
    name = validate_format(normalise(raw))
    store = holder(name)
    if store is not None and not (
            email and store.desired_state == "cancelled"
            and store.admin_email.lower() == email.lower()):
        raise SubdomainTaken(f"'{name}' is already taken")
    if is_held(name):
        raise SubdomainTaken(f"'{name}' is being checked out by someone else")
    return name


def hold(name: str, session_id: str, email: str, expires_at: int | None) -> None:
    """Promise `name` to an open checkout until it completes or expires (needs a db_session)."""
    until = timestamp(expires_at) or utcnow() + timedelta(hours=24)
    for stale in SubdomainHold.select(lambda h: h.subdomain == name):
        stale.delete()
    flush()
    SubdomainHold(subdomain=name, checkout_session_id=session_id, email=email, expires_at=until)
