"""The public API through the real Bottle app (WSGI, no server needed)."""

import pytest
from pony.orm import db_session

from provisioner.models import Instance
from provisioner.web import create_app
from tests.wsgi import call


@pytest.fixture
def app(config):
    return create_app(config)


def test_check_subdomain_available(app):
    status, body = call(app, "POST", "/api/check-subdomain/", {"subdomain": "Janes-Shop"})
    assert status == 200 and body["available"] is True and body["subdomain"] == "janes-shop"


def test_check_subdomain_taken(app):
    with db_session:
        Instance(subdomain="janes-shop", site_name="J", admin_email="j@e.com", port=19100)
    status, body = call(app, "POST", "/api/check-subdomain/", {"subdomain": "janes-shop"})
    assert status == 200 and body["available"] is False and "taken" in body["reason"]


@pytest.mark.parametrize("payload, reason", [
    ({"subdomain": "a;b"}, "only a-z"),
    ({"subdomain": "www"}, "reserved"),
    ({}, "string"),
    (b"{not json", "JSON"),
    ([1], "object"),
])
def test_check_subdomain_bad_input_is_400_with_reason(app, payload, reason):
    status, body = call(app, "POST", "/api/check-subdomain/", payload)
    assert status == 400 and reason in body["error"]


@pytest.mark.parametrize("payload, reason", [
    ({"subdomain": "ok-shop", "site_name": "", "email": "a@b.co"}, "site_name"),
    ({"subdomain": "ok-shop", "site_name": "S", "email": "nope"}, "email"),
    ({"subdomain": "..", "site_name": "S", "email": "a@b.co"}, "at least 3"),
])
def test_create_checkout_bad_input_is_400(app, payload, reason):
    status, body = call(app, "POST", "/api/create-checkout/", payload)
    assert status == 400 and reason in body["error"]


def test_create_checkout_without_stripe_keys_is_503(app):
    status, body = call(app, "POST", "/api/create-checkout/",
                        {"subdomain": "ok-shop", "site_name": "S", "email": "a@b.co"})
    assert status == 503 and "not configured" in body["error"]


def test_webhook_without_signature_is_400_and_stores_nothing(app):
    status, body = call(app, "POST", "/api/webhook/stripe/", {"id": "evt_1", "type": "x"})
    assert status == 400 and "Stripe-Signature" in body["error"]


def test_unknown_route_is_json_404(app):
    status, body = call(app, "GET", "/api/nope/")
    assert status == 404 and body["error"]
