"""The store state machine: every allowed move works, every other one is refused and logged."""

from __future__ import annotations

import itertools

import pytest
from pony.orm import db_session

from provisioner.models import Instance, LogEntry
from provisioner.states import TRANSITIONS, StoreState, transition
from provisioner.web import create_app
from tests.wsgi import basic, call


@pytest.mark.parametrize("current, target", list(itertools.product(StoreState, StoreState)))
def test_every_move_of_the_table(current, target):
    with db_session:
        instance = Instance(subdomain="state-shop", site_name="S", admin_email="s@example.com",
                            port=19120, status=current.value)
        moved = transition(instance, target, "because")
        allowed = target in TRANSITIONS[current]
        assert moved is allowed
        assert instance.status == (target if allowed else current).value
        refusals = [e.message for e in LogEntry.select(lambda e: e.level == "warning")]
        if allowed:
            assert instance.status_message == "because" and not refusals
        else:
            assert refusals == [f"refused status change {current} -> {target} (because)"]


def test_the_table_has_no_dead_ends_but_destroyed():
    for state, targets in TRANSITIONS.items():
        if state == StoreState.DESTROYED:
            assert targets == frozenset()
        elif state == StoreState.NEEDS_ATTENTION:
            assert targets == {StoreState.FAILED}  # an admin's retry, nothing else
        else:
            assert {StoreState.FAILED, StoreState.DESTROYED} <= targets, state
            # Every live state can get back to running unless billing ended it for good.
            assert StoreState.RUNNING in targets or state == StoreState.RUNNING


def test_the_api_filter_takes_its_states_from_the_state_machine(config):
    import dataclasses

    app = create_app(dataclasses.replace(config, admin_password="pw-123456"))
    for state in StoreState:
        status, body = call(app, "GET", "/api/instances/", query=f"status={state}",
                            headers=basic("admin", "pw-123456"))
        assert status == 200, (state, body)
