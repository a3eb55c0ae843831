"""A child started with ``nice`` has every thread at that value; ``set_process_nice`` moves them all."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from smartvm.process import ChildProcess, can_raise_priority, set_process_nice
from tests.support.procfs import thread_nices

pytestmark = pytest.mark.integration

# Starts two threads, then says so and waits.
CHILD = (
    "import threading, time, sys\n"
    "for _ in range(2): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    "print('ready', flush=True); time.sleep(60)\n"
)


_pumps: set[asyncio.Future[None]] = set()


async def started(nice: int) -> ChildProcess:
    lines: asyncio.Queue[str] = asyncio.Queue()

    def consume(stream: asyncio.StreamReader) -> None:
        async def pump() -> None:
            while line := await stream.readline():
                await lines.put(line.decode())

        task = asyncio.ensure_future(pump())
        _pumps.add(task)
        task.add_done_callback(_pumps.discard)

    child = await ChildProcess.spawn([sys.executable, "-c", CHILD], stdout=consume, nice=nice)
    async with asyncio.timeout(30):
        assert (await lines.get()).strip() == "ready"
    return child


async def test_every_thread_starts_at_the_nice_value_and_can_be_moved_back() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    child = await started(7)
    try:
        nices = thread_nices(child.pid)
        assert len(nices) == 3 and set(nices) == {base + 7}
        if can_raise_priority():
            assert set_process_nice(child.pid, base) is True
            assert set(thread_nices(child.pid)) == {base}
        else:  # raising priority again needs CAP_SYS_NICE
            assert set_process_nice(child.pid, base) is False
    finally:
        await child.aclose()
    assert set_process_nice(child.pid, 0) is False  # gone


async def test_default_is_the_parents_nice_value() -> None:
    child = await started(0)
    try:
        assert set(thread_nices(child.pid)) == {os.getpriority(os.PRIO_PROCESS, 0)}
    finally:
        await child.aclose()
