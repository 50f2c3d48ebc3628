"""Customer emails, rendered from jinja2 templates in templates/email/."""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, select_autoescape

from provisioner import mailer
from provisioner.config import Config
from provisioner.models import Instance, LogEntry, utcnow

_templates = Environment(
    loader=PackageLoader("provisioner", "templates"),
    autoescape=select_autoescape(["html"]),
    keep_trailing_newline=True,
)


def render(name: str, **context: object) -> tuple[str, str]:
    text = _templates.get_template(f"email/{name}.txt").render(**context)
    html = _templates.get_template(f"email/{name}.html").render(**context)
    return text, html


def send_welcome(config: Config, instance: Instance) -> bool:
    """Send the welcome email once (needs a db_session); False if it was already sent."""
    if instance.welcome_sent_at is not None:
        return False
    if not instance.admin_password:
        raise RuntimeError(f"store {instance.subdomain} has no temporary password to send")
    store_url = config.store_url(instance.subdomain)
    context = {
        "site_name": instance.site_name,
        "store_url": store_url,
        "admin_url": store_url + "admin/",
        "admin_email": instance.admin_email,
        "password": instance.admin_password,
    }
    text, html = render("welcome", **context)
    message = mailer.build_message(
        config, instance.admin_email, f"Your store {instance.site_name} is ready", text, html,
        message_id=f"welcome-{instance.id}-{instance.subdomain}",
    )
    where = mailer.send(config, message)
    instance.welcome_sent_at = utcnow()
    # The customer has it now; we keep no clear-text copy.
    instance.admin_password = None
    LogEntry(instance=instance, message=f"welcome email sent to {instance.admin_email} via {where}")
    return True
