"""Helpers shared by the Scheduler / session / hostile-code integration tests (no tests here).

A module-scoped :class:`Scheduler` keeps the number of boots down; its qemu-storage-daemon lives as
long as the module, so the per-test check (:func:`assert_no_vms`) allows that one child and
requires no QEMU guest and no overlay / VM directory in the runtime dir; the module fixture then
proves that closing the Scheduler leaves no child process and no runtime dir at all.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.settings import Settings
from tests.integration.conftest import child_processes

__all__ = [
    "assert_closed_clean",
    "assert_no_vms",
    "host_process_count",
    "qemu_children",
    "rss_mb",
    "scheduler_for_tests",
]

_WATCHED = ("qemu-system", "qemu-storage-d", "qemu-img")


def qemu_children(*, include_daemon: bool = True) -> list[tuple[int, str]]:
    found = [(pid, comm) for pid, comm in child_processes() if comm.startswith(_WATCHED)]
    if not include_daemon:
        found = [(pid, comm) for pid, comm in found if not comm.startswith("qemu-storage-d")]
    return found


def host_process_count() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _vm_leftovers(runtime_dir: Path) -> list[str]:
    # Only the overlay pool's directory (ready overlays + its lock) may remain between runs.
    found = []
    for entry in runtime_dir.iterdir():
        if entry.name.startswith("pool-"):
            continue
        found.append(str(entry))
    return sorted(found)


async def _settled(
    probe: Callable[[], Awaitable[dict[str, object]]], settle_s: float
) -> dict[str, object]:
    """Poll ``probe`` (what is left, by kind) until nothing is left or ``settle_s`` has passed;
    returns its last answer for the caller to assert on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    while True:
        left = await probe()
        if not any(left.values()) or loop.time() > deadline:
            return left
        await asyncio.sleep(0.05)


async def assert_no_vms(scheduler: Scheduler, settle_s: float = 3.0) -> None:
    """No QEMU guest child, nothing but the overlay pool in the runtime dir, no capacity held.

    A finished run's VM is stopped in the background right after its result is returned, hence the
    settle time.
    """
    runtime_dir = scheduler.runtime_dir
    assert runtime_dir is not None

    async def leftovers() -> dict[str, object]:
        return {"guests": qemu_children(include_daemon=False), "files": _vm_leftovers(runtime_dir),
                "admission grants held": scheduler.admission.stats().active}

    left = await _settled(leftovers, settle_s)
    assert not any(left.values()), f"leftovers: {left}"


def _all_files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*")) if directory.exists() else []


async def assert_closed_clean(
    runtime_dir: Path, settle_s: float = 3.0, *, ignore: frozenset[int] = frozenset()
) -> None:
    """After ``Scheduler.close()``: no QEMU / daemon child (but those in ``ignore``, started by
    other Schedulers of the test module), the runtime dir empty or gone."""

    async def leftovers() -> dict[str, object]:
        return {"processes": [(pid, comm) for pid, comm in qemu_children() if pid not in ignore],
                "files": await asyncio.to_thread(_all_files, runtime_dir)}

    left = await _settled(leftovers, settle_s)
    assert not any(left.values()), f"leftovers after close: {left}"


_BACKGROUND_STOP_SETTLE_S = 10.0


@asynccontextmanager
async def scheduler_for_tests(config: SchedulerConfig | None = None) -> AsyncIterator[Scheduler]:
    """A started Scheduler (TCG forced) in a fresh short runtime dir; proves a clean close after."""

    async def guests() -> dict[str, object]:
        return {"guests": [p for p in qemu_children() if p[1].startswith("qemu-system")]}

    # A run of an earlier test (e.g. on a module-scoped Scheduler) stops its VM in the background
    # right after returning its result: give that stop the settle time, then no guest may be left.
    alive = await _settled(guests, _BACKGROUND_STOP_SETTLE_S)
    assert not any(alive.values()), f"QEMU guests alive before the scheduler started: {alive}"
    before = qemu_children()
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbs-", dir="/tmp"))
    try:
        scheduler = Scheduler(config, settings=Settings(force_emulation=True), runtime_dir=runtime_dir)
        async with scheduler:
            yield scheduler
        await assert_closed_clean(runtime_dir, ignore=frozenset(pid for pid, _ in before))
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
