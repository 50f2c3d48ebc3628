"""The customer's own page, behind a signed link from their emails (accounts.py)."""

from __future__ import annotations

from bottle import redirect
from pony.orm import db_session

from provisioner import accounts
from provisioner.models import Customer
from provisioner.web.common import Route, Web, page_response, render


def _customer(link: str) -> Customer:
    """The link's customer (needs a db_session), or the page that says why not."""
    try:
        customer = Customer.get(id=accounts.verify(link))
    except accounts.InvalidLink as exc:
        raise page_response(403, _message("Link not valid", str(exc))) from None
    if customer is None:
        raise page_response(404, _message("No such account", "this account no longer exists"))
    return customer


def _message(heading: str, text: str) -> str:
    return render("signup_done.html", heading=heading, text=text)


def account_page(web: Web, link: str):
    with db_session:
        customer = _customer(link)
        return render("account.html", account=accounts.view(web.config, customer),
                      billing_url=f"/account/{link}/billing")


def billing_portal(web: Web, link: str):
    """To Stripe's Customer Portal, with a session made now (they expire in minutes)."""
    with db_session:
        customer = _customer(link)
        try:
            url = accounts.portal_url(web.config, customer,
                                      f"{web.config.public_url}/account/{link}/")
        except accounts.PortalUnavailable as exc:
            return page_response(503, _message("Billing unavailable", str(exc)),
                                 **{"Retry-After": "60"})
    redirect(url, 303)


ROUTES = (
    Route("GET", "/account/<link>/", account_page, per_minute="check_subdomain"),
    Route("GET", "/account/<link>/billing", billing_portal, per_minute="checkout"),
)
