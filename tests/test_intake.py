import json
import time

import pytest
from pony.orm import db_session, select

from provisioner import intake
from provisioner.models import Job, StripeEvent
from provisioner.testing import stripe_events
from tests.conftest import WEBHOOK_SECRET


def signed(evt, secret=WEBHOOK_SECRET, timestamp=None):
    payload = stripe_events.encode(evt)
    return payload, stripe_events.sign(payload, secret, timestamp)


def test_good_signature_is_accepted(signup_events):
    evt = signup_events(subdomain="janes-shop", site_name="Jane", email="j@example.com")[0]
    payload, header = signed(evt)
    assert intake.verify(payload, header, WEBHOOK_SECRET, 300)["id"] == evt["id"]


@pytest.mark.parametrize("case, reason", [
    ("missing", "missing Stripe-Signature"),
    ("wrong-secret", "bad signature"),
    ("stale", "bad signature"),
    ("tampered", "bad signature"),
    ("garbage-header", "signature"),
])
def test_bad_signatures_are_rejected_with_a_reason(signup_events, case, reason):
    evt = signup_events(subdomain="janes-shop", site_name="Jane", email="j@example.com")[0]
    payload, header = signed(evt)
    if case == "missing":
        header = None
    elif case == "wrong-secret":
        payload, header = signed(evt, secret="whsec_other")
    elif case == "stale":
        payload, header = signed(evt, timestamp=int(time.time()) - 301)
    elif case == "tampered":
        payload = payload.replace(b"janes-shop", b"evil-shop")
    elif case == "garbage-header":
        header = "nonsense"
    with pytest.raises(intake.RejectedEvent, match=reason):
        intake.verify(payload, header, WEBHOOK_SECRET, 300)


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"id": "x", "type": "a", "data": {"object": {}}}).encode(), "evt_ id"),
    (json.dumps({"id": "evt_1", "data": {"object": {}}}).encode(), "no type"),
    (json.dumps({"id": "evt_1", "type": "invoice.paid"}).encode(), "data.object"),
])
def test_signed_but_malformed_bodies_are_rejected(body, reason):
    header = stripe_events.sign(body, WEBHOOK_SECRET)
    with pytest.raises(intake.RejectedEvent, match=reason):
        intake.verify(body, header, WEBHOOK_SECRET, 300)


def test_duplicate_event_is_acknowledged_without_new_work(signup_events):
    evt = signup_events(subdomain="janes-shop", site_name="Jane", email="j@example.com")[0]
    payload = stripe_events.encode(evt)
    first = intake.record(evt, payload)
    second = intake.record(evt, payload)
    assert (first.duplicate, second.duplicate) == (False, True)
    with db_session:
        assert StripeEvent.select().count() == 1
        assert select(j for j in Job if j.kind == "event").count() == 1
