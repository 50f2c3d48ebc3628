import itertools

import pytest
from pony.orm import db_session, select

from provisioner import stripe_shapes
from provisioner.models import Instance, Job, Subscription
from provisioner.testing import stripe_events
from tests.conftest import apply_events


def the_instance():
    return Instance.get(subdomain="janes-shop")


@pytest.mark.parametrize("order", list(itertools.permutations([0, 1])))
@pytest.mark.parametrize("old_shape", [False, True])
def test_either_order_and_either_invoice_shape_starts_provisioning(config, order, old_shape):
    evts = stripe_events.signup(subdomain="janes-shop", site_name="Jane's", email="j@example.com",
                                old_invoice_shape=old_shape)
    apply_events(config, [evts[i] for i in order])
    with db_session:
        instance = the_instance()
        assert instance.desired_state == "running"
        assert instance.subscription.payment_confirmed
        assert instance.site_name == "Jane's"
        assert instance.admin_email == "j@example.com"
        assert config.port_range_start <= instance.port <= config.port_range_end
        assert select(j for j in Job if j.kind == "converge" and j.instance == instance
                      and j.state == "queued").count() == 1


def test_checkout_without_payment_waits(config):
    checkout, _ = stripe_events.signup(subdomain="janes-shop", site_name="Jane",
                                       email="j@example.com")
    apply_events(config, [checkout])
    with db_session:
        assert the_instance().desired_state == "pending"
        assert Job.select(lambda j: j.kind == "converge").count() == 0


def test_paid_checkout_alone_is_a_confirmed_payment(config):
    checkout, _ = stripe_events.signup(subdomain="janes-shop", site_name="Jane",
                                       email="j@example.com", checkout_payment_status="paid")
    apply_events(config, [checkout])
    with db_session:
        assert the_instance().desired_state == "running"


def test_email_from_customer_email_when_no_details(config):
    session = stripe_events.checkout_session(
        subdomain="janes-shop", site_name="J", email="c@example.com", customer="cus_1",
        subscription="sub_1", use_customer_email=True)
    apply_events(config, [stripe_events.event("checkout.session.completed", session)])
    with db_session:
        assert the_instance().admin_email == "c@example.com"


def test_invoice_subscription_id_reads_both_shapes():
    new = stripe_events.invoice(customer="cus_1", subscription="sub_new")
    old = stripe_events.invoice(customer="cus_1", subscription="sub_old", old_shape=True)
    assert stripe_shapes.invoice_subscription_id(new) == "sub_new"
    assert stripe_shapes.invoice_subscription_id(old) == "sub_old"
    assert new.get("subscription") is None


def test_invoice_without_subscription_is_ignored(config):
    inv = stripe_events.invoice(customer="cus_1", subscription="sub_x")
    inv["parent"] = None
    inv["lines"]["data"] = []
    apply_events(config, [stripe_events.event("invoice.paid", inv)])
    with db_session:
        assert Subscription.select().count() == 0


def test_unknown_event_type_is_recorded_and_ignored(config):
    evt = stripe_events.event("plan.created", stripe_events.resource("plan"))
    apply_events(config, [evt])
    with db_session:
        assert Instance.select().count() == 0


@pytest.mark.parametrize("bad", ["", "a;b", "a\nb", "..", "ADMIN", "www", "x" * 64])
def test_checkout_with_bad_subdomain_needs_attention_not_a_store(config, bad):
    checkout, paid = stripe_events.signup(subdomain=bad, site_name="J", email="j@example.com")
    apply_events(config, [checkout, paid])
    with db_session:
        parked = Instance.get(checkout_session_id=checkout["data"]["object"]["id"])
        assert (parked.status, parked.live, parked.port) == ("needs_attention", False, 0)
        assert "no usable subdomain" in parked.status_message
        assert select(j for j in Job if j.kind == "converge").count() == 0
        assert select(j for j in Job if j.kind == "notify"
                      and j.detail.startswith("admin_attention")).count() == 1


def test_second_checkout_for_a_taken_subdomain_needs_attention(config):
    first = stripe_events.signup(subdomain="janes-shop", site_name="J", email="j@example.com")
    second = stripe_events.signup(subdomain="janes-shop", site_name="K", email="k@example.com")
    apply_events(config, first + second)
    with db_session:
        live = select(i for i in Instance if i.live)[:]
        assert [i.admin_email for i in live] == ["j@example.com"]
        parked = Instance.get(admin_email="k@example.com")
        assert parked.status == "needs_attention" and "was taken" in parked.status_message
        assert select(j for j in Job if j.kind == "converge").count() == 1


def test_stores_get_distinct_ports(config):
    for n in range(3):
        apply_events(config, stripe_events.signup(subdomain=f"shop-{n}", site_name="S",
                                                  email=f"{n}@example.com"))
    with db_session:
        assert len(set(select(i.port for i in Instance))) == 3
