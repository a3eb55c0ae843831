"""The agent's wall-clock step: validated input, and never applied outside PID 1 of a guest."""

from __future__ import annotations

import time

import pytest

from exec_sandbox.guest.sbx_agent.system_ops import _set_wall_clock
from exec_sandbox.guest.sbx_agent.wire import RequestError


@pytest.mark.parametrize("value", ["1700000000", -1, 1.5, True, [1]])
def test_a_bad_stamp_is_an_invalid_request(value: object) -> None:
    with pytest.raises(RequestError, match="wall_time_ns"):
        _set_wall_clock(value)


def test_no_stamp_leaves_the_clock_alone() -> None:
    assert _set_wall_clock(None) is None


def test_outside_pid_1_a_far_off_stamp_is_not_applied() -> None:
    # This test process is not PID 1: were the guard broken, the step is 5 s ahead (harmless here).
    before = time.time()
    assert _set_wall_clock(time.time_ns() + 5 * 10**9) is None
    assert time.time() - before < 4.0
