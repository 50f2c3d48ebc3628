"""Alerts where operators look: one incident per problem, told once when it opens and
once when it clears, by email (ADMIN_NOTIFY_EMAIL) and to every ALERT_WEBHOOKS target.

`raise_alert` and `resolve` only write the incident (callers in the worker process,
backups, lifecycle have no config at hand, and no network I/O belongs in their
transactions). `deliver_due(config)`, run every few seconds by `serve`'s scheduler,
turns incidents into one AlertDelivery per target *configured at that moment* (so
a target added while an incident is open hears of it too) and sends what is due:
claimed in one short transaction, sent with none open, recorded in another.

A webhook URL may hold a secret (Slack's do): it is never stored, logged or shown;
deliveries name their target "webhook <n> (<host>)".
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from urllib.parse import urlsplit

from pony.orm import db_session, desc, flush

from provisioner import mailer
from provisioner.config import Config
from provisioner.models import AlertDelivery, AlertIncident, Instance, utcnow
from provisioner.redaction import redact

log = logging.getLogger(__name__)

KINDS = ("provision_failed", "store_down", "backup_failed", "cert_renewal_failed",
         "disk_full")
TITLES = {
    "provision_failed": "provisioning failed",
    "store_down": "store down",
    "backup_failed": "backup failed",
    "cert_renewal_failed": "certificate renewal failed",
    "disk_full": "disk nearly full",
}

EMAIL = "email"
MAX_ATTEMPTS = 10
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_CAP = timedelta(hours=1)
# A claimed delivery is not claimed again for this long (a send that died with its
# process is retried after it).
CLAIM_LEASE = timedelta(minutes=2)
WEBHOOK_TIMEOUT_SECONDS = 10
BATCH = 20
ROUNDS = 3
# An incident that opened and cleared between two deliveries is still told (both
# messages); older resolved ones never told anyone (no target was configured) stay
# quiet, so configuring a first target does not replay history.
LATE_INCIDENT_WINDOW = timedelta(hours=24)


def key_of(kind: str, instance: Instance | None = None, extra: str = "") -> str:
    """The incident's stable key: the same problem of the same store is one incident."""
    if instance is not None and instance.id is None:
        flush()  # a store made in this transaction: its id is the key
    parts = [kind] + ([str(instance.id)] if instance is not None else []) + \
        ([extra] if extra else [])
    return ":".join(parts)


def raise_alert(kind: str, summary: str, instance: Instance | None = None,
                extra: str = "") -> AlertIncident:
    """Open the incident, or note it is still there (summary, last_seen_at: nothing is
    sent again). Needs a db_session. Deliveries are queued by `deliver_due`, which
    knows the targets; this keeps the callers free of a config."""
    key = key_of(kind, instance, extra)
    incident = AlertIncident.get(key=key, resolved_at=None)
    if incident is None:
        incident = AlertIncident(key=key, kind=kind, instance=instance, summary=summary)
        log.warning("alert opened: %s", key)
    else:
        incident.last_seen_at, incident.summary = utcnow(), summary
    return incident


def resolve(kind: str, instance: Instance | None = None, extra: str = "") -> bool:
    """Close the open incident, if there is one, and queue "resolved" to each target
    already told "opened" (one told later gets it when that send lands). Needs a
    db_session. A new problem after this is a new incident."""
    incident = AlertIncident.get(key=key_of(kind, instance, extra), resolved_at=None)
    if incident is None:
        return False
    incident.resolved_at = utcnow()
    _queue_resolved(incident, incident.resolved_at)
    log.info("alert resolved: %s", incident.key)
    return True


def _queue_resolved(incident: AlertIncident, now: datetime,
                    only: set[str] | None = None) -> None:
    """One "resolved" per target whose "opened" was sent, not twice."""
    for opened in incident.deliveries.select(lambda d: d.event == "opened"
                                             and d.status == "sent"):
        if only is not None and opened.target not in only:
            continue
        if AlertDelivery.get(incident=incident, target=opened.target,
                             event="resolved") is None:
            AlertDelivery(incident=incident, target=opened.target, event="resolved",
                          next_try_at=now)


# -- targets -----------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    label: str
    kind: str  # email | json | slack
    address: str = field(repr=False)


def _host(url: str) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname or '?'}" + (f":{port}" if port else "")


def targets(config: Config) -> dict[str, Target]:
    """The targets by label: the label is what the DB, logs and pages ever hold."""
    found: dict[str, Target] = {}
    if config.admin_notify_email:
        found[EMAIL] = Target(EMAIL, "email", config.admin_notify_email)
    for n, entry in enumerate(config.alert_webhooks, 1):
        url = entry.removeprefix("slack:")
        label = f"webhook {n} ({_host(url)})"
        found[label] = Target(label, "slack" if entry.startswith("slack:") else "json", url)
    return found


def _expand(config: Config, now: datetime) -> None:
    """Queue the deliveries the incidents need for the current targets (db_session)."""
    labels = set(targets(config))
    if not labels:
        return
    since = now - LATE_INCIDENT_WINDOW
    for incident in AlertIncident.select(lambda a: a.resolved_at is None
                                         or a.resolved_at >= since):
        opened = {d.target for d in incident.deliveries if d.event == "opened"}
        if incident.resolved_at is None or not opened:
            for label in sorted(labels - opened):
                AlertDelivery(incident=incident, target=label, event="opened",
                              next_try_at=now)
        if incident.resolved_at is not None:
            _queue_resolved(incident, now, only=labels)


# -- what is sent ------------------------------------------------------------------

def _stamp(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") + "Z" if moment else None


def _admin_url(config: Config, incident: AlertIncident) -> str:
    if incident.instance is None:
        return f"{config.public_url}/admin/"
    return f"{config.public_url}/admin/instances/{incident.instance.id}/"


def payload(config: Config, incident: AlertIncident, event: str) -> dict:
    """The generic webhook's JSON (docs/alerts.md shows it)."""
    return {
        "event": event,
        "kind": incident.kind,
        "key": incident.key,
        "store": incident.instance.subdomain if incident.instance is not None else None,
        "summary": incident.summary,
        "opened_at": _stamp(incident.opened_at),
        "resolved_at": _stamp(incident.resolved_at),
        "admin_url": _admin_url(config, incident),
    }


def _headline(incident: AlertIncident, event: str) -> str:
    word = "ALERT" if event == "opened" else "RESOLVED"
    title = TITLES.get(incident.kind, incident.kind)
    store = f" store {incident.instance.subdomain}" if incident.instance is not None else ""
    return f"{word}{store}: {title}"


def _slack_escape(text: str) -> str:
    """Slack reads &, < and > as markup (`<!channel>` pings everyone): data stays data."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(config: Config, incident: AlertIncident, event: str) -> dict:
    text = "\n".join([_headline(incident, event), incident.summary,
                      _admin_url(config, incident)])
    return {"text": _slack_escape(text)}


def email_message(config: Config, incident: AlertIncident, event: str) -> EmailMessage:
    from provisioner import notifications  # notifications -> accounts -> lifecycle -> here

    instance = incident.instance
    context = {
        "event": event,
        "headline": _headline(incident, event),
        "title": TITLES.get(incident.kind, incident.kind),
        "kind": incident.kind,
        "key": incident.key,
        "summary": incident.summary,
        "subdomain": instance.subdomain if instance is not None else "",
        "site_name": instance.site_name if instance is not None else "",
        "store_url": config.store_url(instance.subdomain) if instance is not None else "",
        "admin_page": _admin_url(config, incident),
        "opened_at": _stamp(incident.opened_at),
        "resolved_at": _stamp(incident.resolved_at),
    }
    text, html = notifications.render("admin_alert", **context)
    return mailer.build_message(config, config.admin_notify_email,
                                f"[provisioner] {context['headline']}", text, html,
                                message_id=f"alert-{incident.id}-{event}")


# -- delivery ----------------------------------------------------------------------

@dataclass(frozen=True)
class Outgoing:
    """A claimed delivery, ready to go with no transaction open."""

    delivery_id: int
    incident_key: str
    event: str
    target: Target
    body: bytes | EmailMessage = field(repr=False)


def backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min, ... capped at an hour: ten attempts span about three hours."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempts - 1))


def _claim(config: Config, now: datetime) -> list[Outgoing]:
    found = targets(config)
    claimed = []
    with db_session:
        _expand(config, now)
        flush()
        due = AlertDelivery.select(lambda d: d.status == "pending" and d.next_try_at <= now) \
            .order_by(AlertDelivery.next_try_at, AlertDelivery.id)[:BATCH]
        for delivery in due:
            target = found.get(delivery.target)
            delivery.attempts += 1
            if target is None:
                delivery.status = "failed"
                delivery.last_error = "target no longer configured"
                log.error("alert %s %s to %s: target no longer configured",
                          delivery.incident.key, delivery.event, delivery.target)
                continue
            delivery.next_try_at = now + CLAIM_LEASE
            incident = delivery.incident
            try:
                body = _body(config, target, incident, delivery.event)
            except Exception as error:  # noqa: BLE001 (a bad template holds up no other)
                _failed(delivery, _describe(error, target), now)
                continue
            claimed.append(Outgoing(delivery.id, incident.key, delivery.event, target, body))
    return claimed


def _body(config: Config, target: Target, incident: AlertIncident,
          event: str) -> bytes | EmailMessage:
    if target.kind == "email":
        return email_message(config, incident, event)
    data = slack_payload(config, incident, event) if target.kind == "slack" else \
        payload(config, incident, event)
    return json.dumps(data).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer we did not ask for: a failure, not a second POST."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes) -> None:
    if not url.startswith(("http://", "https://")):  # settings.webhook_targets checks too
        raise ValueError("not an http(s) URL")
    request = urllib.request.Request(  # noqa: S310 (http(s) only, checked above)
        url, data=body, method="POST",
        headers={"Content-Type": "application/json",
                 "User-Agent": "ebuilder-provisioner-alerts"})
    with _opener.open(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
        response.read(65536)


def _describe(error: BaseException, target: Target) -> str:
    """The failure in words that never carry the target's address."""
    if isinstance(error, urllib.error.HTTPError):
        text = f"HTTP {error.code}"
    elif isinstance(error, urllib.error.URLError):
        text = f"connection failed: {error.reason}"
    elif isinstance(error, TimeoutError):
        text = f"no answer within {WEBHOOK_TIMEOUT_SECONDS} s"
    else:
        text = f"{type(error).__name__}: {error}"
    parts = urlsplit(target.address)
    secrets = [target.address, parts.path, parts.query, parts.netloc] \
        if target.kind != "email" else []
    return redact(text, secrets)[:500]


def _send(config: Config, outgoing: Outgoing) -> str | None:
    """Send one; the error (already safe to keep) or None."""
    try:
        if isinstance(outgoing.body, EmailMessage):
            mailer.send(config, outgoing.body)
        else:
            _post(outgoing.target.address, outgoing.body)
    except Exception as error:  # noqa: BLE001 (every failure is recorded, then retried)
        return _describe(error, outgoing.target)
    return None


def _record(outgoing: Outgoing, error: str | None, now: datetime) -> None:
    with db_session:
        delivery = AlertDelivery.get(id=outgoing.delivery_id)
        if delivery is None:
            return
        if error is None:
            delivery.status, delivery.sent_at, delivery.last_error = "sent", now, None
            if delivery.event == "opened" and delivery.incident.resolved_at is not None:
                _queue_resolved(delivery.incident, now, only={delivery.target})
            log.info("alert %s %s sent to %s", outgoing.incident_key, outgoing.event,
                     outgoing.target.label)
            return
        _failed(delivery, error, now)


def _failed(delivery: AlertDelivery, error: str, now: datetime) -> None:
    """A failed attempt: retried after its backoff, or "failed" for good (visible)."""
    delivery.last_error = error
    where = (delivery.incident.key, delivery.event, delivery.target)
    if delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = "failed"
        log.error("alert %s %s to %s failed for good after %d attempts: %s",
                  *where, delivery.attempts, error)
        return
    delivery.next_try_at = now + backoff(delivery.attempts)
    log.warning("alert %s %s to %s failed (attempt %d of %d, next in %s): %s",
                *where, delivery.attempts, MAX_ATTEMPTS, backoff(delivery.attempts), error)


def deliver_due(config: Config, now: datetime | None = None) -> int:
    """Queue what incidents need, send what is due; how many were sent. `now` lets a
    test stand at a later moment instead of waiting for a backoff."""
    now = now or utcnow()
    sent = 0
    for _ in range(ROUNDS):  # a "resolved" queued by its "opened" landing goes too
        claimed = _claim(config, now)
        for outgoing in claimed:
            error = _send(config, outgoing)
            _record(outgoing, error, now)
            sent += error is None
        if not claimed:
            break
    return sent


# -- what admins see (no addresses: labels only) -----------------------------------

def _as_dict(incident: AlertIncident, deliveries: bool = True) -> dict:
    return {
        "id": incident.id,
        "key": incident.key,
        "kind": incident.kind,
        "title": TITLES.get(incident.kind, incident.kind),
        "store": incident.instance.subdomain if incident.instance is not None else None,
        "instance_id": incident.instance.id if incident.instance is not None else None,
        "summary": incident.summary,
        "opened_at": _stamp(incident.opened_at),
        "last_seen_at": _stamp(incident.last_seen_at),
        "resolved_at": _stamp(incident.resolved_at),
        "deliveries": [{
            "target": d.target, "event": d.event, "status": d.status,
            "attempts": d.attempts, "last_error": d.last_error,
            "sent_at": _stamp(d.sent_at),
            "next_try_at": _stamp(d.next_try_at) if d.status == "pending" else None,
        } for d in incident.deliveries.select().order_by(AlertDelivery.id)] if deliveries
        else None,
    }


def open_incidents(limit: int | None = None, deliveries: bool = True) -> list[dict]:
    """The open incidents, newest first, at most `limit`; without their deliveries, in
    two queries however many (needs a db_session)."""
    rows = AlertIncident.select(lambda a: a.resolved_at is None).order_by(
        desc(AlertIncident.id)).prefetch(AlertIncident.instance, AlertIncident.summary)
    return [_as_dict(i, deliveries) for i in (rows[:limit] if limit else rows)]


def recent(limit: int = 50) -> list[dict]:
    """The latest incidents, open or resolved, newest first (needs a db_session)."""
    return [_as_dict(i) for i in AlertIncident.select().order_by(desc(AlertIncident.id))[:limit]]


def deliveries_failed() -> int:
    """Deliveries that gave up: a target that never heard (needs a db_session)."""
    return AlertDelivery.select(lambda d: d.status == "failed").count()
