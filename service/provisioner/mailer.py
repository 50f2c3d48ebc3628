"""Sending email: SMTP when EMAIL_HOST is set, `.eml` files in the outbox otherwise."""

from __future__ import annotations

import os
import re
import smtplib
from email.message import EmailMessage
from email.utils import formatdate

from provisioner.config import Config


def build_message(config: Config, to: str, subject: str, text: str, html: str | None,
                  message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = config.default_from_email
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    # A stable Message-ID lets receivers drop a duplicate if a retry ever resends.
    message["Message-ID"] = f"<{message_id}@{config.base_domain}>"
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def send(config: Config, message: EmailMessage) -> str:
    """Deliver the message; return where it went (for the log, never its body)."""
    if config.email_host:
        with smtplib.SMTP(config.email_host, config.email_port,
                          timeout=config.smtp_timeout_seconds) as smtp:
            if config.email_use_tls:
                smtp.starttls()
            if config.email_host_user:
                smtp.login(config.email_host_user, config.email_host_password)
            smtp.send_message(message)
        return f"smtp://{config.email_host}:{config.email_port}"
    config.outbox_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", message["Message-ID"].strip("<>")) + ".eml"
    path = config.outbox_dir / name
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(message.as_bytes())
    temporary.replace(path)
    return str(path)
