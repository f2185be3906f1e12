"""Recovery's decision as a table: every QEMU run state x hibernation image x saved intent."""

from __future__ import annotations

import itertools

import pytest

from cbsd.core.vm.recovery import Step, plan
from cbsd.qemu.runstate import RunState

S = RunState
NOTHING: tuple[Step, ...] = ()

# The cases with something to do; every other combination must do nothing.
EXPECTED: dict[tuple[RunState | None, bool, str], tuple[Step, ...]] = {}
for image, intent in itertools.product((False, True), ("", "running", "paused")):
    # A restore or resume that never finished loading: that QEMU never got its state.
    EXPECTED[(S.INMIGRATE, image, intent)] = (Step.KILL,)
for state in RunState:
    if state is S.INMIGRATE:
        continue
    for intent in ("", "running", "paused"):
        # Beside a published image a QEMU has not run since the image was made (suspend ends
        # it, resume retires the image first) -- unless it runs: then the image is stale.
        EXPECTED[(state, True, intent)] = ((Step.DROP_IMAGE,) if state is S.RUNNING
                                           else (Step.POWER_OFF,))
EXPECTED[(S.POSTMIGRATE, False, "running")] = (Step.CONT,)
EXPECTED[(S.POSTMIGRATE, False, "paused")] = (Step.CONT_THEN_STOP,)
EXPECTED[(S.POSTMIGRATE, False, "")] = (Step.CONT_THEN_STOP,)
EXPECTED[(S.PAUSED, False, "running")] = (Step.CONT,)

CASES = list(itertools.product([None, *RunState], (False, True), ("", "running", "paused")))


@pytest.mark.parametrize(("state", "image", "intent"), CASES)
def test_plan(state: RunState | None, image: bool, intent: str) -> None:
    assert plan(state, image, intent) == EXPECTED.get((state, image, intent), NOTHING)


def test_no_qemu_means_nothing_to_do_to_it() -> None:
    assert all(plan(None, image, intent) == NOTHING for _, image, intent in CASES)


def test_the_table_covers_every_run_state_qemu_has() -> None:
    assert len(CASES) == (len(RunState) + 1) * 2 * 3
    assert RunState.parse("a-state-from-a-newer-qemu") is None
