"""``Session.save`` + ``Scheduler.restore_session``: a session written to disk and brought back in a
new VM (interpreter state and files intact), restorable more than once, leaving nothing behind."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxInputError
from exec_sandbox.sandbox.lifecycle_errors import SessionClosedError
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests(SchedulerConfig()) as sched:
        yield sched


async def test_saved_session_restores_state_and_files_twice(scheduler: Scheduler, tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    async with await scheduler.session(language="python", env_vars={"A": "1"}) as s:
        await s.exec("kept = 'x' * 3")
        await s.write_file("f.txt", b"on disk")
        assert await s.save(snap) == snap
        await s.exec("kept = 'changed after the save'")  # the session goes on after saving
        assert (await s.exec("print(kept)")).stdout == "changed after the save\n"
    for entry in snap.iterdir():  # guest memory on the host: private files only
        assert stat.S_IMODE(entry.stat().st_mode) & 0o077 == 0, entry
    restored = [await scheduler.restore_session(snap, env_vars={"A": "2"}) for _ in range(2)]
    try:
        for r in restored:
            assert r.language == "python" and r.restored_from_snapshot
            assert (await r.exec("print(kept)")).stdout == "xxx\n"
            assert await r.read_file("f.txt") == b"on disk"
            assert (await r.exec("import os; print(os.environ['A'])")).stdout == "2\n"
        await restored[0].exec("kept = 'only in the first'")
        assert (await restored[1].exec("print(kept)")).stdout == "xxx\n"
    finally:
        for r in restored:
            await r.close()
    await assert_no_vms(scheduler)


async def test_restore_refuses_a_non_snapshot_and_save_a_closed_session(
    scheduler: Scheduler, tmp_path: Path
) -> None:
    with pytest.raises(SandboxInputError):
        await scheduler.restore_session(tmp_path)
    s = await scheduler.session(language="raw")
    await s.close()
    with pytest.raises(SessionClosedError):
        await s.save(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    await assert_no_vms(scheduler)
