"""Emails to customers and admins, rendered from jinja2 templates in templates/email/.

Each (store, notice, key) goes out once: its Notification row is committed as
"sending" before the SMTP exchange and "sent" after it, so a database that is
busy after a send never causes a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from jinja2 import Environment, PackageLoader, select_autoescape
from pony.orm import flush

from provisioner import accounts, mailer, store_plans
from provisioner.config import Config
from provisioner.models import Instance, LogEntry, Notification, utcnow

_templates = Environment(
    loader=PackageLoader("provisioner", "templates"),
    autoescape=select_autoescape(["html"]),
    keep_trailing_newline=True,
)

SUBJECTS = {
    "welcome": "Your store {site_name} is ready",
    "payment_warning": "Payment problem with your store {site_name}",
    "suspended": "Your store {site_name} is suspended",
    "restored": "Your store {site_name} is back online",
    "closed": "Your store {site_name} is closed",
    "trial_ending": "Your free trial of {site_name} ends soon",
    "payment_action": "Please confirm your payment for {site_name}",
    "admin_dispute": "[provisioner] store {subdomain}: a payment is disputed",
    "admin_plan_refused": "[provisioner] store {subdomain}: plan change refused",
    "admin_disk_over": "[provisioner] store {subdomain} uses more disk than its plan",
    "admin_attention": "[provisioner] store {subdomain} needs attention",
    "admin_unhealthy": "[provisioner] store {subdomain} is unhealthy",
    "admin_job_failed": "[provisioner] store {subdomain}: a job failed",
    "admin_welcome_delayed": "[provisioner] store {subdomain}: welcome email not sent yet",
}


def render(name: str, **context: object) -> tuple[str, str]:
    text = _templates.get_template(f"email/{name}.txt").render(**context)
    html = _templates.get_template(f"email/{name}.html").render(**context)
    return text, html


@dataclass(frozen=True)
class Outgoing:
    """An email ready to go: its Notification row is committed as "sending"."""

    notification_id: int
    instance_id: int | None
    notice: str
    recipient: str
    message: EmailMessage


# Notices that carry the customer's signed account link (and the billing portal's).
ACCOUNT_LINK_NOTICES = frozenset({"payment_warning", "suspended", "closed", "trial_ending",
                                  "payment_action", "restored", "welcome"})


def _context(config: Config, instance: Instance, notice: str) -> dict:
    store_url = config.store_url(instance.subdomain)
    subscription = instance.subscription
    account_url = accounts.account_url(config, instance.customer) \
        if instance.customer is not None and notice in ACCOUNT_LINK_NOTICES else ""
    return {
        "account_url": account_url,
        "billing_url": account_url + "billing" if account_url else "",
        "admin_page": f"{config.public_url}/admin/instances/{instance.id}/",
        "plan_name": store_plans.name_of(config, instance),
        "plan_price": store_plans.billed_text(config, instance),
        "status": instance.status,
        "trial_end": subscription.trial_end.date().isoformat()
        if subscription and subscription.trial_end else "",
        "plan_problem": instance.plan_problem or "",
        "site_name": instance.site_name,
        "subdomain": instance.subdomain,
        "store_url": store_url,
        "admin_url": store_url + "admin/",
        "admin_email": instance.admin_email,
        "status_message": instance.status_message or "",
        "suspend_after_days": config.suspend_after_days,
        "delete_after": instance.delete_after.date().isoformat() if instance.delete_after else "",
        "period_end": subscription.current_period_end.date().isoformat()
        if subscription and subscription.current_period_end else "",
        "since": instance.provisioned_at.isoformat(timespec="minutes") + " UTC"
        if instance.provisioned_at else "",
    }


def prepare(config: Config, instance: Instance, notice: str, key: str = "-",
            detail: str = "") -> Outgoing | None:
    """Render one notice and mark it "sending" (needs a db_session; commit before
    sending). None when it went out already or has nobody to go to.

    A "sending" row left by a process that died mid-send is sent again, with the
    same Message-ID: a customer without their login is worse than a duplicate."""
    row = Notification.get(instance=instance, notice=notice, key=key)
    if row is not None and row.status == "sent":
        return None
    if notice == "welcome" and instance.welcome_sent_at is not None:
        return None
    recipient = config.admin_notify_email if notice.startswith("admin_") else \
        instance.admin_email
    if not recipient:
        LogEntry(instance=instance, level="warning",
                 message=f"{notice}: no recipient (set ADMIN_NOTIFY_EMAIL)")
        if row is None:
            Notification(instance=instance, notice=notice, key=key, recipient="-")
        return None
    context = {**_context(config, instance, notice), "detail": detail}
    if notice == "welcome":
        if not instance.admin_password:
            raise RuntimeError(f"store {instance.subdomain} has no temporary password to send")
        context["password"] = instance.admin_password
    text, html = render(notice, **context)
    message = mailer.build_message(
        config, recipient, SUBJECTS[notice].format(**context), text, html,
        message_id="-".join([notice, str(instance.id), instance.subdomain]
                            + ([key.replace(":", "")] if key != "-" else [])),
    )
    if row is None:
        row = Notification(instance=instance, notice=notice, key=key, recipient=recipient,
                           status="sending")
    else:
        row.recipient, row.sent_at = recipient, utcnow()
    flush()
    return Outgoing(row.id, instance.id, notice, recipient, message)


def sent(outgoing: Outgoing, where: str) -> None:
    """The SMTP server took it (needs a db_session)."""
    row = Notification[outgoing.notification_id]
    row.status, row.sent_at = "sent", utcnow()
    instance = row.instance
    if outgoing.notice == "welcome":
        instance.welcome_sent_at = utcnow()
        # The customer has it now; we keep no clear-text copy.
        instance.admin_password = None
    LogEntry(instance=instance, message=f"{outgoing.notice} email sent to "
                                        f"{outgoing.recipient} via {where}")


def not_sent(outgoing: Outgoing) -> None:
    """The send failed for certain: forget the attempt (needs a db_session)."""
    row = Notification.get(id=outgoing.notification_id)
    if row is not None and row.status == "sending":
        row.delete()


def send_notice(config: Config, instance: Instance, notice: str, key: str = "-") -> bool:
    """Send one notice once, all in the caller's db_session (tests, the CLI); the
    worker uses prepare / mailer.send / sent in separate transactions instead."""
    outgoing = prepare(config, instance, notice, key)
    if outgoing is None:
        return False
    sent(outgoing, mailer.send(config, outgoing.message))
    return True


def send_welcome(config: Config, instance: Instance) -> bool:
    return send_notice(config, instance, "welcome")
