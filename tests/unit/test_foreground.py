"""ForegroundActivity: counting foreground work and waiting for a gap between it."""

from __future__ import annotations

import asyncio

import pytest

from exec_sandbox.sandbox.foreground import ForegroundActivity


async def test_counts_nested_operations_and_reports_a_gap() -> None:
    fg = ForegroundActivity()
    assert fg.active == 0 and await fg.wait_for_gap(0.0)
    with fg.track():
        with fg.track():
            assert fg.active == 2
        assert fg.active == 1
    assert fg.active == 0 and await fg.wait_for_gap(0.0)


async def test_wait_for_gap_returns_when_the_last_operation_ends() -> None:
    fg = ForegroundActivity()
    release = asyncio.Event()

    async def operation() -> None:
        with fg.track():
            await release.wait()

    task = asyncio.ensure_future(operation())
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(fg.wait_for_gap(10.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    release.set()
    assert await waiter is True
    await task


async def test_wait_for_gap_gives_up_after_max_wait() -> None:
    fg = ForegroundActivity()
    with fg.track():
        assert await fg.wait_for_gap(0.05) is False
    assert fg.active == 0


async def test_an_operation_that_raises_is_still_uncounted() -> None:
    fg = ForegroundActivity()
    with pytest.raises(RuntimeError), fg.track():
        raise RuntimeError("boom")
    assert fg.active == 0 and await fg.wait_for_gap(0.0)
