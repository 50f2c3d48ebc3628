"""Emails to customers and admins, rendered from jinja2 templates in templates/email/.

Each (store, notice, key) goes out once: the Notification row written with
the send is the proof, checked before every send.
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, select_autoescape

from provisioner import mailer
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
    "admin_attention": "[provisioner] store {subdomain} needs attention",
    "admin_unhealthy": "[provisioner] store {subdomain} is unhealthy",
}


def render(name: str, **context: object) -> tuple[str, str]:
    text = _templates.get_template(f"email/{name}.txt").render(**context)
    html = _templates.get_template(f"email/{name}.html").render(**context)
    return text, html


def send_notice(config: Config, instance: Instance, notice: str, key: str = "-") -> bool:
    """Send one notice once (needs a db_session); False if it had already gone out."""
    if Notification.get(instance=instance, notice=notice, key=key) is not None:
        return False
    if notice == "welcome" and instance.welcome_sent_at is not None:
        return False
    recipient = config.admin_notify_email if notice.startswith("admin_") else \
        instance.admin_email
    if not recipient:
        LogEntry(instance=instance, level="warning",
                 message=f"{notice}: no recipient (set ADMIN_NOTIFY_EMAIL)")
        Notification(instance=instance, notice=notice, key=key, recipient="-")
        return False
    store_url = config.store_url(instance.subdomain)
    subscription = instance.subscription
    context = {
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
    }
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
    where = mailer.send(config, message)
    Notification(instance=instance, notice=notice, key=key, recipient=recipient)
    if notice == "welcome":
        instance.welcome_sent_at = utcnow()
        # The customer has it now; we keep no clear-text copy.
        instance.admin_password = None
    LogEntry(instance=instance, message=f"{notice} email sent to {recipient} via {where}")
    return True


def send_welcome(config: Config, instance: Instance) -> bool:
    return send_notice(config, instance, "welcome")
