"""Customers' own domains for their stores (being built: DNS check, ACME certificate,
vhost, ALLOWED_HOSTS, renewal, removal)."""

from __future__ import annotations

from provisioner.config import Config
from provisioner.models import Instance


def for_store(instance: Instance) -> list[dict]:
    """What the roles get about the store's domains: every name not removed (its
    ALLOWED_HOSTS), with the certificate and key paths once issued (its vhost)."""
    return [{"name": d.name, "cert": d.cert_path or "", "key": d.key_path or ""}
            for d in instance.domains.select(lambda d: d.removed_at is None).order_by(
                lambda d: d.id)]


def run_job(config: Config, job_id: int) -> str:
    raise NotImplementedError("custom domains are not built yet")
