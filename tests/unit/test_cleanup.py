"""smartvm.cleanup.shielded: cleanup finishes, the caller's cancellation is never swallowed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from smartvm.cleanup import UndoStack, UndoStep, shielded


class _Cleanup:
    """A cleanup step that blocks until released and records that it ran to its end."""

    def __init__(self, *, fail: bool = False) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False
        self._fail = fail

    async def run(self) -> str:
        self.started.set()
        await self.release.wait()
        self.finished = True
        if self._fail:
            raise OSError("undo failed")
        return "done"


async def test_returns_the_result_without_cancellation() -> None:
    step = _Cleanup()
    step.release.set()
    assert await shielded(step.run()) == "done"
    assert step.finished


async def test_raises_the_cleanup_error_without_cancellation() -> None:
    step = _Cleanup(fail=True)
    step.release.set()
    with pytest.raises(OSError, match="undo failed"):
        await shielded(step.run())


async def test_cancelled_caller_waits_for_cleanup_then_is_cancelled() -> None:
    step = _Cleanup()
    caller = asyncio.create_task(shielded(step.run()))
    await step.started.wait()
    caller.cancel()
    await asyncio.sleep(0)
    caller.cancel()  # a second cancel does not cut the cleanup short either
    for _ in range(5):
        await asyncio.sleep(0)
    assert not caller.done()
    assert not step.finished
    step.release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert step.finished
    assert caller.cancelled()


async def test_cancel_in_the_same_turn_as_completion_is_not_swallowed() -> None:
    step = _Cleanup()
    caller = asyncio.create_task(shielded(step.run()))
    await step.started.wait()
    # The cleanup wakes first and finishes before the caller sees its CancelledError.
    step.release.set()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert step.finished
    assert caller.cancelled()


async def test_timeout_still_fires_after_the_cleanup() -> None:
    step = _Cleanup()

    async def release_later() -> None:
        await step.started.wait()
        for _ in range(3):
            await asyncio.sleep(0)
        step.release.set()

    releaser = asyncio.create_task(release_later())
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await shielded(step.run())
    await releaser
    assert step.finished


async def test_cleanup_error_during_cancellation_is_logged_and_cancel_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = _Cleanup(fail=True)
    caller = asyncio.create_task(shielded(step.run()))
    await step.started.wait()
    caller.cancel()
    await asyncio.sleep(0)
    step.release.set()
    with caplog.at_level(logging.WARNING, logger="smartvm.cleanup"), pytest.raises(asyncio.CancelledError):
        await caller
    assert step.finished
    assert any("undo failed" in record.getMessage() for record in caplog.records)


class _Recorder:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def step(self, name: str, *, fail: bool = False, cancel: bool = False) -> UndoStep:
        async def run() -> None:
            self.ran.append(name)
            if fail:
                raise OSError(f"{name} failed")
            if cancel:
                raise asyncio.CancelledError

        return run


async def test_undo_runs_newest_first_and_only_once() -> None:
    rec = _Recorder()
    undo = UndoStack("test owner")
    for name in ("first", "second", "third"):
        undo.push(name, rec.step(name))
    assert len(undo) == 3
    assert await undo.run() == []
    assert rec.ran == ["third", "second", "first"]
    assert len(undo) == 0
    assert await undo.run() == []
    assert rec.ran == ["third", "second", "first"]


async def test_undo_failure_is_logged_returned_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = _Recorder()
    undo = UndoStack("test owner")
    undo.push("first", rec.step("first"))
    undo.push("broken", rec.step("broken", fail=True))
    undo.push("last", rec.step("last"))
    with caplog.at_level(logging.WARNING, logger="smartvm.cleanup"):
        failures = await undo.run()
    assert rec.ran == ["last", "broken", "first"]
    assert [(what, str(exc)) for what, exc in failures] == [("broken", "broken failed")]
    assert any("test owner" in r.getMessage() and "'broken'" in r.getMessage() for r in caplog.records)


async def test_undo_cancelled_step_does_not_stop_the_rest_and_cancel_is_re_raised() -> None:
    rec = _Recorder()
    undo = UndoStack("test owner")
    undo.push("first", rec.step("first", fail=True))
    undo.push("cut short", rec.step("cut short", cancel=True))
    undo.push("last", rec.step("last"))
    with pytest.raises(asyncio.CancelledError):
        await undo.run()
    assert rec.ran == ["last", "cut short", "first"]
    assert len(undo) == 0


async def test_shielded_undo_finishes_every_step_when_the_caller_is_cancelled() -> None:
    step = _Cleanup()
    rec = _Recorder()
    undo = UndoStack("test owner")
    undo.push("first", rec.step("first"))

    async def slow() -> None:
        await step.run()

    undo.push("slow", slow)
    caller = asyncio.create_task(shielded(undo.run()))
    await step.started.wait()
    caller.cancel()
    await asyncio.sleep(0)
    step.release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert step.finished
    assert rec.ran == ["first"]
