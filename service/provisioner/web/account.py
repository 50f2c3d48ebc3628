"""The customer's own page, behind a signed link from their emails (accounts.py): their
stores, and each store's own domains (add one, see the DNS record to create and how far
it got, remove it)."""

from __future__ import annotations

import hmac
from urllib.parse import quote

from bottle import HTTPResponse, redirect, request
from pony.orm import db_session

from provisioner import accounts, admin, domains
from provisioner.models import Customer, Instance
from provisioner.web.auth import client_address, header, same_text
from provisioner.web.common import FORM_TYPE, Route, Web, page_response, render, same_origin
from provisioner.web.domains import change


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


def _stores(customer: Customer):
    """The customer's stores, in the order accounts.view lists them."""
    return customer.instances.select(lambda i: i.live).order_by(lambda i: i.id)


def _form_token(web: Web, link: str) -> str:
    """The forms' CSRF token: bound to this link, made with the app's own key."""
    return hmac.new(web.csrf_key, f"account:{link}".encode(), "sha256").hexdigest()


def account_page(web: Web, link: str):
    with db_session:
        customer = _customer(link)
        own_domains = [domains.detail(web.config, store) for store in _stores(customer)]
        return render("account.html", account=accounts.view(web.config, customer),
                      billing_url=f"/account/{link}/billing", domains=own_domains,
                      link=link, csrf=_form_token(web, link),
                      flash=(request.query.get("flash") or "")[:300])


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


def _check_form(web: Web, link: str) -> None:
    """Our own form only: URL-encoded, this link's token, from our own origin."""
    if request.content_type.split(";")[0].strip().lower() != FORM_TYPE:
        raise HTTPResponse(status=415, body=f"send the form as {FORM_TYPE}")
    if not same_text(request.forms.get("csrf", ""), _form_token(web, link)):
        raise HTTPResponse(status=403, body="bad or missing form token: reload the page")
    if not same_origin(header("Origin") or header("Referer"), header("Host"),
                       web.config.public_url):
        raise HTTPResponse(status=403, body="cross-site request refused")


def _domain_change(web: Web, link: str, what: str, domain_id: int | None = None):
    with db_session:
        customer = _customer(link)  # the link first: a bad one is a 403 that shows nothing
    _check_form(web, link)
    store_text = (request.forms.get("store") or "")[:12]
    name = (request.forms.get("name") or "")[:300] if what == "add" else None
    try:
        with db_session:
            customer = Customer[customer.id]
            store = Instance.get(id=int(store_text)) if store_text.isdigit() else None
            if store is None or store.customer != customer or not store.live:
                raise admin.Conflict("no such store on this account")
            by = admin.Actor(f"customer:{customer.id}", client_address(web.config))
            result = change(web, store.id, what, by, name=name, domain_id=domain_id)
    except admin.Conflict as exc:
        flash = str(exc)
    else:
        web.notify_worker()
        flash = (f"{result['domain']['name']} added: create the DNS record below; we check "
                 "it and get its certificate" if what == "add"
                 else f"{result['domain']['name']} is being removed")
    redirect(f"/account/{link}/?flash={quote(flash)}#domains", 303)


def add_domain(web: Web, link: str):
    _domain_change(web, link, "add")


def remove_domain(web: Web, link: str, domain_id: int):
    _domain_change(web, link, "remove", domain_id)


ROUTES = (
    Route("GET", "/account/<link>/", account_page, per_minute="check_subdomain"),
    Route("GET", "/account/<link>/billing", billing_portal, per_minute="checkout"),
    Route("POST", "/account/<link>/domains/", add_domain, per_minute="checkout"),
    Route("POST", "/account/<link>/domains/<domain_id:int>/remove/", remove_domain,
          per_minute="checkout"),
)
