"""Density through the public API with the DEFAULT admission policy: a dozen idle sessions opened at
once are all admitted (FIFO; starts queue on the CPU budget, idle sessions hold memory only), all
answer, and nothing is left after close. Real guests under TCG; no timing asserts."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler, SchedulerState
from exec_sandbox.sandbox.session import Session
from exec_sandbox.settings import Settings
from tests.integration.test_scheduler_support import assert_closed_clean, qemu_children

pytestmark = pytest.mark.integration

SESSIONS = 12


@pytest.mark.timeout(600)
async def test_a_dozen_idle_sessions_are_admitted_by_default_and_all_answer() -> None:
    config = SchedulerConfig()  # the default admission policy
    before = frozenset(pid for pid, _ in qemu_children())
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))
    snapshot_dir = Path(tempfile.mkdtemp(prefix="sbx-density-", dir="/var/tmp"))
    sessions: list[Session] = []
    try:
        scheduler = Scheduler(
            config,
            settings=Settings(force_emulation=True),
            runtime_dir=runtime_dir,
            snapshot_dir=snapshot_dir,
        )
        async with scheduler:
            admission = scheduler.admission
            assert admission.memory_probe is not None  # the live guard is on by default
            # The first session cold-boots and fills the private snapshot cache; the rest restore.
            sessions.append(await scheduler.session())
            cache = scheduler.snapshot_cache
            assert cache is not None
            await cache.wait_saved()
            # All others at once: more than the CPU budget may start together on small hosts,
            # so some queue (FIFO) until earlier ones are up - none may be refused.
            opened = await asyncio.gather(*(scheduler.session() for _ in range(SESSIONS - 1)))
            sessions.extend(opened)
            assert sum(s.restored_from_snapshot for s in sessions) >= 1

            stats = admission.stats()
            assert stats.active == SESSIONS and stats.waiting == 0
            assert stats.busy == 0 and stats.cpu_in_use == 0  # idle sessions hold no CPU share
            assert stats.starting_memory_mb == 0
            assert stats.memory_in_use_mb == SESSIONS * admission.cost_mb(config.default_memory_mb)
            assert stats.live_available_mb is not None and stats.live_available_mb > 0
            assert stats.timed_out_total == 0 and stats.rejected_total == 0
            assert admission.max_idle_vms(config.default_memory_mb) >= SESSIONS

            answers = await asyncio.gather(*(s.exec(f"print({i} * 7)") for i, s in enumerate(sessions)))
            assert [a.stdout for a in answers] == [f"{i * 7}\n" for i in range(SESSIONS)]
            assert all(a.exit_code == 0 for a in answers)
            assert len({s.vm_id for s in sessions}) == SESSIONS

            await asyncio.gather(*(s.close() for s in sessions))
            assert admission.stats().active == 0 and admission.stats().memory_in_use_mb == 0
        assert scheduler.state is SchedulerState.CLOSED
        await assert_closed_clean(runtime_dir, ignore=before)
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)
        shutil.rmtree(snapshot_dir, ignore_errors=True)
