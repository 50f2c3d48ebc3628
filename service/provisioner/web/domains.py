"""Customers' own domains: the admin API and the store page's forms (audited like every
admin action), and the ACME HTTP-01 answers every nginx host passes on to us.
The work is domains.add / remove / recheck; these only carry it."""

from __future__ import annotations

from urllib.parse import quote

from bottle import HTTPResponse, redirect, request
from pony.orm import commit, db_session

from provisioner import admin, certificates, domains
from provisioner.web.common import Route, Web, json_body, json_response, or_404

# Who acted, what: the audit log's words for each change.
ACTIONS = {"add": "domain_add", "remove": "domain_remove", "check": "domain_check"}


def change(web: Web, instance_id: int, what: str, by: admin.Actor, *, name: object = None,
           domain_id: int | None = None) -> dict:
    """Add, remove or check a store's domain, audited (refusals too); needs a
    db_session. Raises admin.NotFound for an unknown store, admin.Conflict when refused."""
    instance = admin.get_instance(instance_id)
    target = f"instance:{instance.id}"
    try:
        if what == "add":
            domain, job = domains.add(web.config, instance, name)
        elif what == "remove":
            domain, job = domains.remove(instance, domain_id)
        else:
            domain, job = domains.recheck(instance, domain_id)
    except domains.Refused as exc:
        shown = name if isinstance(name, str) else domain_id
        admin.audit(by, ACTIONS[what], target, f"refused: {str(shown)[:100]}: {exc}")
        commit()
        raise admin.Conflict(str(exc)) from None
    admin.audit(by, ACTIONS[what], target,
                f"{instance.subdomain}: {domain.name} {what} queued as job {job.id}")
    commit()
    return {"instance_id": instance.id, "job_id": job.id,
            "domain": domains.summary(web.config, domain),
            "status_url": f"/api/jobs/{job.id}/"}


def _api_change(web: Web, instance_id: int, what: str, **kwargs) -> HTTPResponse:
    try:
        with db_session:
            result = or_404(lambda: change(web, instance_id, what, web.actor(), **kwargs))
    except admin.Conflict as exc:
        return json_response(409, {"error": str(exc)})
    web.notify_worker()
    return json_response(202, result)


def listing(web: Web, instance_id: int):
    with db_session:
        store = or_404(admin.get_instance, instance_id)
        return json_response(200, domains.detail(web.config, store))


def add(web: Web, instance_id: int):
    web.check_api_post()
    name = json_body().get("name")
    if not isinstance(name, str) or len(name) > 300:
        return json_response(400, {"error": "name (the domain, e.g. shop.example.com) is "
                                            "required, at most 253 characters"})
    return _api_change(web, instance_id, "add", name=name)


def remove(web: Web, instance_id: int, domain_id: int):
    web.check_api_post()
    json_body()
    return _api_change(web, instance_id, "remove", domain_id=domain_id)


def check(web: Web, instance_id: int, domain_id: int):
    web.check_api_post()
    json_body()
    return _api_change(web, instance_id, "check", domain_id=domain_id)


def _field(name: str, limit: int) -> str:
    """A form field, read only once check_csrf has accepted the form."""
    return (request.forms.get(name) or "")[:limit]


def _page_change(web: Web, instance_id: int, what: str, domain_id: int | None = None):
    web.check_csrf()  # first: nothing of a foreign or malformed form is read before
    name = _field("name", 300) if what == "add" else None
    try:
        with db_session:
            result = or_404(lambda: change(web, instance_id, what, web.actor(), name=name,
                                           domain_id=domain_id), page=True)
    except admin.Conflict as exc:
        flash = str(exc)
    else:
        web.notify_worker()
        flash = f"{result['domain']['name']}: {what} queued as job {result['job_id']}"
    redirect(f"/admin/instances/{instance_id}/?flash={quote(flash)}#domains", 303)


def page_add(web: Web, instance_id: int):
    _page_change(web, instance_id, "add")


def page_remove(web: Web, instance_id: int, domain_id: int):
    _page_change(web, instance_id, "remove", domain_id)


def page_check(web: Web, instance_id: int, domain_id: int):
    _page_change(web, instance_id, "check", domain_id)


def acme_challenge(web: Web, token: str):
    """The key authorization of an ACME order in progress (nginx passes the CA's request
    on from any host name); 404 for anything else."""
    answer = certificates.challenge_answer(web.config, token)
    if answer is None:
        return HTTPResponse(status=404, body="no such challenge",
                            headers={"Content-Type": "text/plain", "Cache-Control": "no-store"})
    return HTTPResponse(status=200, body=answer,
                        headers={"Content-Type": "text/plain", "Cache-Control": "no-store"})


ROUTES = (
    Route("GET", "/.well-known/acme-challenge/<token>", acme_challenge),
    Route("GET", "/api/instances/<instance_id:int>/domains/", listing, auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/domains/", add, auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/domains/<domain_id:int>/remove/", remove,
          auth="api"),
    Route("POST", "/api/instances/<instance_id:int>/domains/<domain_id:int>/check/", check,
          auth="api"),
    Route("POST", "/admin/instances/<instance_id:int>/domains/", page_add, auth="page"),
    Route("POST", "/admin/instances/<instance_id:int>/domains/<domain_id:int>/remove/",
          page_remove, auth="page"),
    Route("POST", "/admin/instances/<instance_id:int>/domains/<domain_id:int>/check/",
          page_check, auth="page"),
)
