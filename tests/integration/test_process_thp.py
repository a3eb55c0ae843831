"""ChildProcess.spawn(thp_disable=True) really turns transparent huge pages off in the child."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartvm.process import ChildProcess

pytestmark = pytest.mark.integration


async def _thp_enabled_line(**kwargs: bool) -> str:
    proc = await ChildProcess.spawn(["grep", "THP_enabled", "/proc/self/status"], **kwargs)
    assert await proc.wait(10.0) == 0
    await proc.settle_output()
    line = proc.stdout_tail().strip()
    await proc.aclose()
    return line


def _own_thp_enabled_line() -> str:
    status = Path("/proc/self/status").read_text()
    return next(ln for ln in status.splitlines() if ln.startswith("THP_enabled"))


async def test_thp_disable_is_inherited_across_exec() -> None:
    assert (await _thp_enabled_line(thp_disable=True)).split() == ["THP_enabled:", "0"]
    ours = _own_thp_enabled_line()
    assert (await _thp_enabled_line()).split() == ours.split()  # without the flag: inherited as is
