"""Customers' own domains for their stores: the DNS record to create, its check, an
ACME certificate (certificates.py), the vhost and ALLOWED_HOSTS (through the store's
converge: StoreVars.custom_domains), renewal and removal.

A domain moves through its statuses one DOMAIN job at a time (run_job, in the worker's
ansible lane, so never beside another run for the same store):

    dns_pending --DNS points here--> issuing --certificate--> live --renewed--> live
         |  (not yet: checked again later)   |  (ACME keeps failing)
         '-- never within DNS_WAIT -> failed  '-> failed  (an admin's or customer's
                                                            "check again": dns_pending)
    any -- removed by the customer, an admin, or the store's end --> removing -> removed

The store's vhost carries every name not being removed: a name without a certificate
gets only its HTTP server (the ACME challenge path passed to this service, anything
else "being set up"), one with a certificate its HTTPS server too.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime, timedelta

from pony.orm import db_session, flush, select

from provisioner import alerts, certificates, jobs
from provisioner.config import Config
from provisioner.models import CustomDomain, Instance, Job, LogEntry, utcnow
from provisioner.states import JobKind, StoreState

DNS_PENDING, ISSUING, LIVE, FAILED, REMOVING, REMOVED = (
    "dns_pending", "issuing", "live", "failed", "removing", "removed")
# Not yet pointing here: looked at again after this long, for at most DNS_WAIT.
DNS_RECHECK = timedelta(minutes=10)
DNS_WAIT = timedelta(days=7)
DNS_TIMEOUT_SECONDS = 5.0
# A store that does not run (suspended, stopped, failing): its domain waits this long.
STORE_RECHECK = timedelta(hours=1)
MAX_PER_STORE = 10
# A renewal failing this many times in a row alerts the admin (the job keeps trying).
RENEWAL_ALERT_AFTER = 3
# What a store's converge can run on its own for a domain change, by state.
RUNNING, PAGED = StoreState.RUNNING, (StoreState.SUSPENDED, StoreState.CANCELLED)

_LABEL = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")

STATUS_WORDS = {
    DNS_PENDING: "waiting for the DNS record",
    ISSUING: "getting its certificate",
    LIVE: "live",
    FAILED: "failed",
    REMOVING: "being removed",
    REMOVED: "removed",
}


class Refused(Exception):
    """A domain cannot be added or changed so; the message says why (shown as it is)."""


# -- what a name may be ---------------------------------------------------------------

def normalize(config: Config, raw: object) -> str:
    """A customer's host name, lower-cased, or Refused with the reason: a plain DNS
    name of at least two labels, no wildcard, no IP address, not under BASE_DOMAIN."""
    if not isinstance(raw, str) or not raw.strip():
        raise Refused("give a domain name, e.g. shop.example.com")
    name = raw.strip().lower().removesuffix(".")
    if len(name) > 253:
        raise Refused("a domain name has at most 253 characters")
    if "*" in name:
        raise Refused("a wildcard cannot be added: give one host name, e.g. shop.example.com")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise Refused("give a domain name, not an IP address")
    if not _HOSTNAME.fullmatch(name):
        raise Refused("not a valid domain name: letters, digits and hyphens in dot-separated "
                      "labels, e.g. shop.example.com")
    if name.rsplit(".", 1)[1].isdigit():
        raise Refused("not a valid domain name: its last label is a number")
    base = config.base_domain.lower()
    if name == base or name.endswith("." + base):
        raise Refused(f"names under {base} are ours: every store already has one")
    if name == "localhost" or name.endswith(".localhost"):
        raise Refused("localhost cannot be a store's domain")
    return name


# -- the DNS record ----------------------------------------------------------------

def target_of(config: Config, instance: Instance) -> tuple[str, list[str]]:
    """What a domain must point at: ("CNAME", [host]) or ("A", [addresses])."""
    return _target_for(config, instance.subdomain)


def dns_record(config: Config, instance: Instance, name: str) -> dict:
    """The record the customer creates at their DNS provider, as data and as text."""
    kind, values = target_of(config, instance)
    if kind == "A":
        lines = [f"{name}. {'AAAA' if ':' in v else 'A'} {v}" for v in values]
    else:
        lines = [f"{name}. CNAME {values[0]}."]
    return {"type": kind, "name": name, "values": values, "text": "\n".join(lines),
            "apex_note": kind == "CNAME" and name.count(".") == 1}


def _resolver():
    import dns.resolver

    return dns.resolver


def resolve(config: Config, name: str) -> set[str]:
    """The addresses `name` resolves to (CNAMEs followed), from DNS_SERVER when set,
    else the system's resolvers. An empty set when it has none."""
    resolver_module = _resolver()
    resolver = resolver_module.Resolver(configure=not config.dns_server)
    if config.dns_server:
        host, _, port = config.dns_server.partition("#")
        resolver.nameservers = [host]
        resolver.port = int(port or 53)
    resolver.lifetime = DNS_TIMEOUT_SECONDS
    found: set[str] = set()
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except (resolver_module.NXDOMAIN, resolver_module.NoNameservers,
                resolver_module.NoAnswer):
            continue
        except resolver_module.LifetimeTimeout as exc:
            raise DNSUnavailable(f"no DNS answer for {name} ({exc})") from None
        if answer.rrset is not None:
            found.update(str(r.address) for r in answer.rrset)
    return found


class DNSUnavailable(Exception):
    """The DNS servers did not answer (a retry, not a verdict on the record)."""


def dns_verdict(name: str, found: set[str], expected: set[str]) -> str:
    """'' when the name points here (every address of it is one of ours), else why not."""
    if not expected:
        return "the target has no address in DNS (ask the operator)"
    if not found:
        return f"{name} has no A/AAAA record yet"
    stray = sorted(found - expected)
    if stray:
        return (f"{name} points at {', '.join(stray)}, not at this service "
                f"({', '.join(sorted(expected))})")
    return ""


def check_dns(config: Config, name: str, subdomain: str) -> str:
    """'' when `name` points where it should, else what is wrong."""
    kind, values = _target_for(config, subdomain)
    expected = set(values) if kind == "A" else resolve(config, values[0])
    return dns_verdict(name, resolve(config, name), expected)


def _target_for(config: Config, subdomain: str) -> tuple[str, list[str]]:
    configured = [t.strip() for t in config.custom_domain_target.split(",") if t.strip()]
    if configured:
        try:
            return "A", [str(ipaddress.ip_address(t)) for t in configured]
        except ValueError:
            return "CNAME", configured[:1]
    return "CNAME", [config.store_host(subdomain)]


# -- what the roles get ------------------------------------------------------------

def for_store(instance: Instance) -> list[dict]:
    """What the roles get about the store's domains: every name not removed or being
    removed (its ALLOWED_HOSTS), with the certificate and key paths once issued (its
    vhost; empty until then)."""
    wanted = (DNS_PENDING, ISSUING, LIVE, FAILED)
    return [{"name": d.name, "cert": d.cert_path or "", "key": d.key_path or ""}
            for d in instance.domains.select(
                lambda d: d.removed_at is None and d.status in wanted).order_by(
                lambda d: d.id)]


# -- views -------------------------------------------------------------------------

def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") + "Z" if moment else None


def summary(config: Config, domain: CustomDomain) -> dict:
    return {"id": domain.id, "name": domain.name, "status": domain.status,
            "status_words": STATUS_WORDS.get(domain.status, domain.status),
            "dns_record": dns_record(config, domain.instance, domain.name),
            "expires_at": _iso(domain.expires_at), "checked_at": _iso(domain.checked_at),
            "created_at": _iso(domain.created_at), "removed_at": _iso(domain.removed_at),
            "last_error": domain.last_error or None,
            "url": f"https://{domain.name}/" if domain.status == LIVE else None}


def current(instance: Instance):
    return instance.domains.select(lambda d: d.removed_at is None).order_by(lambda d: d.id)


def detail(config: Config, instance: Instance) -> dict:
    """The store's domains for its admin page and the API (needs a db_session)."""
    items = [summary(config, d) for d in current(instance)]
    kind, values = target_of(config, instance)
    return {"instance_id": instance.id, "items": items,
            "target": {"type": kind, "values": values},
            "can_add": instance.live and instance.status != StoreState.CANCELLED
            and len(items) < MAX_PER_STORE,
            "limit": MAX_PER_STORE}


# -- changes (need a db_session; the caller audits) --------------------------------

def _enqueue(domain: CustomDomain, delay: timedelta = timedelta(0)) -> Job:
    return jobs.enqueue(JobKind.DOMAIN, instance=domain.instance, detail=str(domain.id),
                        delay=delay)


def add(config: Config, instance: Instance, raw_name: object) -> tuple[CustomDomain, Job]:
    """Record a new domain for the store and queue its first check."""
    name = normalize(config, raw_name)
    if not instance.live or instance.status == StoreState.DESTROYED:
        raise Refused("this store no longer exists")
    if instance.status == StoreState.CANCELLED:
        raise Refused("this store is closed: subscribe again to use your own domain")
    if current(instance).count() >= MAX_PER_STORE:
        raise Refused(f"a store has at most {MAX_PER_STORE} domains of its own")
    taken = CustomDomain.select(lambda d: d.name == name and d.removed_at is None).first()
    if taken is not None:
        raise Refused(f"{name} is already "
                      f"{'this' if taken.instance == instance else 'another'} store's domain")
    domain = CustomDomain(instance=instance, name=name, status=DNS_PENDING)
    flush()
    return domain, _enqueue(domain)


def find(instance: Instance, domain_id: int) -> CustomDomain:
    domain = CustomDomain.get(id=domain_id)
    if domain is None or domain.instance != instance or domain.removed_at is not None:
        raise Refused(f"store {instance.id} has no domain {domain_id}")
    return domain


def remove(instance: Instance, domain_id: int) -> tuple[CustomDomain, Job]:
    """Queue the removal: vhost, ALLOWED_HOSTS, certificate files."""
    domain = find(instance, domain_id)
    if domain.status != REMOVING:
        domain.status = REMOVING
        domain.last_error = None
    return domain, _enqueue(domain)


def recheck(instance: Instance, domain_id: int) -> tuple[CustomDomain, Job]:
    """Look at a waiting or failed domain again now (a failed one starts over)."""
    domain = find(instance, domain_id)
    if domain.status == REMOVING:
        raise Refused(f"{domain.name} is being removed")
    if domain.status == FAILED:
        domain.status = DNS_PENDING if not domain.cert_path else LIVE
        domain.created_at = utcnow()  # the DNS wait starts again
    return domain, _enqueue(domain)


def store_ended(config: Config, instance: Instance) -> int:
    """The store is cancelled or destroyed: its domains are removed at once (needs a
    db_session). The converge that follows (closed page, or destroy) no longer carries
    them, so its vhost and container drop them; their certificates go now. Returns how
    many were removed."""
    removed = 0
    for domain in list(current(instance)):
        _mark_removed(config, domain)
        removed += 1
    return removed


def _mark_removed(config: Config, domain: CustomDomain) -> None:
    certificates.remove_files(config, domain.cert_path, domain.key_path)
    if not CustomDomain.select(lambda d: d.name == domain.name and d.id != domain.id
                               and d.removed_at is None).exists():
        certificates.remove_name(config, domain.name)
    domain.status, domain.removed_at = REMOVED, utcnow()
    domain.cert_path = domain.key_path = None
    alerts.resolve("cert_renewal_failed", domain.instance, extra=domain.name)


def renew_due(config: Config) -> int:
    """Queue a DOMAIN job for every live certificate expiring within ACME_RENEW_DAYS
    (the daily schedule). Returns how many were queued."""
    with db_session:
        horizon = utcnow() + timedelta(days=config.acme_renew_days)
        due = select(d for d in CustomDomain if d.status == LIVE and d.removed_at is None
                     and d.instance.live and d.expires_at is not None
                     and d.expires_at <= horizon)
        count = 0
        for domain in due.order_by(CustomDomain.id):
            _enqueue(domain)
            count += 1
        return count


def _due_for_renewal(config: Config, domain: CustomDomain) -> bool:
    return domain.expires_at is None or \
        domain.expires_at <= utcnow() + timedelta(days=config.acme_renew_days)


# -- the DOMAIN job ----------------------------------------------------------------

class StepFailed(Exception):
    """A step that failed and is retried by the worker (with backoff)."""


def run_job(config: Config, job_id: int) -> str:
    """worker._care: the domain's next step. Opens its own short transactions, none
    across DNS, ACME or a playbook run. Returns the log line; raises to retry."""
    with db_session:
        job = Job[job_id]
        domain = CustomDomain.get(id=int(job.detail or 0))
        if domain is None:
            raise jobs.Final(f"no custom domain {job.detail!r}")
        domain_id, status, name = domain.id, domain.status, domain.name
        instance = domain.instance
        store_state, live, subdomain = instance.status, instance.live, instance.subdomain
        attempts = job.attempts
    if status == REMOVED:
        return f"{name}: already removed"
    if not live or store_state == StoreState.DESTROYED:
        with db_session:
            _mark_removed(config, CustomDomain[domain_id])
        return f"{name}: removed with its store"
    if status == REMOVING:
        return _remove_step(config, job_id, domain_id, name, store_state)
    if status == FAILED:
        return f"{name}: failed; check it again to retry"
    if status == DNS_PENDING:
        verdict = _dns_step(config, domain_id, name, subdomain)
        if verdict:
            return verdict
        status = ISSUING
    if store_state not in (RUNNING, *PAGED):
        with db_session:
            domain = CustomDomain[domain_id]
            domain.last_error = f"the store is {store_state}: set up once it runs again"
            _enqueue(domain, STORE_RECHECK)
        return f"{name}: waiting for the store ({store_state}) to run"
    if status == ISSUING or (status == LIVE and _needs_certificate(config, domain_id)):
        return _issue_step(config, job_id, domain_id, name, status, attempts)
    _converge(config, job_id, domain_id)
    return f"{name}: live, vhost and ALLOWED_HOSTS in step"


def _needs_certificate(config: Config, domain_id: int) -> bool:
    with db_session:
        return _due_for_renewal(config, CustomDomain[domain_id])


def _dns_step(config: Config, domain_id: int, name: str, subdomain: str) -> str:
    """'' when DNS points here (the domain moves on to issuing), else the log line (a
    re-check is queued; after DNS_WAIT the domain fails)."""
    try:
        verdict = check_dns(config, name, subdomain)
    except DNSUnavailable as exc:
        raise StepFailed(str(exc)) from None
    with db_session:
        domain = CustomDomain[domain_id]
        domain.checked_at = utcnow()
        if not verdict:
            domain.status, domain.last_error = ISSUING, None
            return ""
        domain.last_error = verdict
        if utcnow() - domain.created_at > DNS_WAIT:
            domain.status = FAILED
            domain.last_error = f"{verdict}; gave up after {DNS_WAIT.days} days (check again " \
                                "once the record is there)"
            return f"{name}: DNS never pointed here, failed"
        _enqueue(domain, DNS_RECHECK)
        return f"{name}: DNS not ready ({verdict}); checked again in " \
               f"{int(DNS_RECHECK.total_seconds() // 60)} minutes"


def _issue_step(config: Config, job_id: int, domain_id: int, name: str, status: str,
                attempts: int) -> str:
    renewal = status == LIVE
    if not renewal:
        # Its HTTP server first (the challenge path), for a name this vhost lacks yet.
        _converge(config, job_id, domain_id)
    try:
        issued = certificates.issue(config, name)
    except certificates.IssueFailed as exc:
        _issue_failed(config, domain_id, str(exc), renewal, attempts)
        raise StepFailed(str(exc)) from None
    with db_session:
        domain = CustomDomain[domain_id]
        if domain.status not in (ISSUING, LIVE) or domain.removed_at is not None:
            certificates.remove_files(config, issued.cert_path, issued.key_path)
            return f"{name}: certificate not used, the domain is {domain.status}"
        old = (domain.cert_path, domain.key_path)
        domain.cert_path, domain.key_path = issued.cert_path, issued.key_path
        domain.expires_at, domain.status, domain.last_error = issued.expires_at, LIVE, None
        if renewal:
            alerts.resolve("cert_renewal_failed", domain.instance, extra=name)
        LogEntry(instance=domain.instance, job=Job[job_id],
                 message=f"{name}: certificate {issued.serial} issued, expires "
                         f"{issued.expires_at:%Y-%m-%d}")
    _converge(config, job_id, domain_id)
    with db_session:
        certificates.remove_files(config, *(p for p in old if p != issued.cert_path
                                            and p != issued.key_path))
    return f"{name}: certificate {'renewed' if renewal else 'issued'} (serial {issued.serial}, " \
           f"expires {issued.expires_at:%Y-%m-%d}), served by nginx"


def _issue_failed(config: Config, domain_id: int, error: str, renewal: bool,
                  attempts: int) -> None:
    with db_session:
        domain = CustomDomain[domain_id]
        domain.last_error = error[:4000]
        if renewal and attempts >= RENEWAL_ALERT_AFTER:
            alerts.raise_alert("cert_renewal_failed",
                               f"the certificate of {domain.name} (store "
                               f"{domain.instance.subdomain}) could not be renewed; it "
                               f"expires {domain.expires_at:%Y-%m-%d}: {error}"[:1000],
                               domain.instance, extra=domain.name)
        elif not renewal and attempts >= config.job_max_attempts:
            domain.status = FAILED


def _remove_step(config: Config, job_id: int, domain_id: int, name: str,
                 store_state: str) -> str:
    if store_state in (RUNNING, *PAGED):
        _converge(config, job_id, domain_id)  # without it: vhost, ALLOWED_HOSTS
    with db_session:
        _mark_removed(config, CustomDomain[domain_id])
    return f"{name}: removed (vhost, ALLOWED_HOSTS, certificate)"


def _converge(config: Config, job_id: int, domain_id: int) -> None:
    """Bring the store's container and vhost to its domains now: provision.yml for a
    running store, suspend.yml (its page) for a suspended or closed one."""
    from provisioner.ansible import operations, store_vars
    from provisioner.ansible.operations import Operation

    with db_session:
        instance = CustomDomain[domain_id].instance
        state = instance.status
        if state == RUNNING:
            operation, store = Operation.PROVISION, store_vars.of_instance(config, instance)
        elif state in PAGED:
            page = store_vars.VHOST_OF_STATE[StoreState(state)]
            operation = Operation.SUSPEND
            store = store_vars.of_instance(config, instance).with_(page=page, vhost=page)
        else:
            return
    result = operations.run(config, operation, [store], jobs={store.name: job_id})
    outcome = result.hosts.get(store.name)
    if outcome is None or not outcome.ok:
        raise StepFailed(f"{operation.value} of {store.name} failed: "
                         f"{outcome.error if outcome else result.status}")


def refresh(config: Config, instance: Instance) -> Job | None:
    """Queue a domain job that converges the store (e.g. after it runs again) if it has
    domains (needs a db_session)."""
    first = current(instance).first()
    return _enqueue(first) if first is not None else None

