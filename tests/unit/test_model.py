"""The state machine: which status allows which action, and what the refusal says."""

from __future__ import annotations

import pytest

from cbsd.errors import StateError
from cbsd.model import ALLOWED, Action, Nic, Status, VMSpec, require


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("status", list(Status))
def test_require_follows_the_table(action: Action, status: Status) -> None:
    if status in ALLOWED[action]:
        require("vm1", status, action)
    else:
        with pytest.raises(StateError) as e:
            require("vm1", status, action)
        assert e.value.message.startswith("vm1: ")
        assert e.value.exit_code == 1


def test_maintenance_allows_nothing() -> None:
    assert all(Status.MAINTENANCE not in allowed for allowed in ALLOWED.values())


@pytest.mark.parametrize(("action", "status", "fragment"), [
    (Action.START, Status.ON, "already running"),
    (Action.START, Status.PAUSED, "already running"),
    (Action.RESTORE, Status.ON, "stop it before restoring"),
    (Action.STOP, Status.SUSPENDED, "bsuspend mode=discard"),
    (Action.CHECKPOINT, Status.OFF, "is Off"),
])
def test_messages_users_rely_on(action: Action, status: Status, fragment: str) -> None:
    with pytest.raises(StateError, match=fragment):
        require("vm1", status, action)


def test_spec_round_trips_and_ignores_unknown_keys() -> None:
    spec = VMSpec(jname="a", ram=1 << 30, disks=["dsk1.qcow2"], nics=[Nic(hostfwd=["tcp:1:2"])])
    d = spec.to_dict()
    d["future_field"] = 1
    assert VMSpec.from_dict(d) == spec
