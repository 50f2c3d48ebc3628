"""Alerts where operators look: one incident per problem, told once when it opens and
once when it clears, by email and to every ALERT_WEBHOOKS target.

(Being built: the delivery side lands with the alerts work; the calls below are the
contract the rest of the service uses.)
"""

from __future__ import annotations

from provisioner.models import AlertIncident, Instance, utcnow

KINDS = ("provision_failed", "store_down", "backup_failed", "cert_renewal_failed",
         "disk_full")


def key_of(kind: str, instance: Instance | None = None, extra: str = "") -> str:
    """The incident's stable key: the same problem of the same store is one incident."""
    parts = [kind] + ([str(instance.id)] if instance is not None else []) + \
        ([extra] if extra else [])
    return ":".join(parts)


def raise_alert(kind: str, summary: str, instance: Instance | None = None,
                extra: str = "") -> AlertIncident:
    """Open the incident (or note it is still there); needs a db_session."""
    key = key_of(kind, instance, extra)
    incident = AlertIncident.get(key=key, resolved_at=None)
    if incident is None:
        incident = AlertIncident(key=key, kind=kind, instance=instance, summary=summary)
    else:
        incident.last_seen_at, incident.summary = utcnow(), summary
    return incident


def resolve(kind: str, instance: Instance | None = None, extra: str = "") -> bool:
    """Close the open incident, if there is one; needs a db_session."""
    incident = AlertIncident.get(key=key_of(kind, instance, extra), resolved_at=None)
    if incident is None:
        return False
    incident.resolved_at = utcnow()
    return True
