"""Attack: make the run outlast its timeout. The host, not the guest, enforces the wall clock.

- Fill the guest's tmpfs mounts (/tmp and /dev/shm), then sleep past the timeout: tmpfs pages
  cannot be reclaimed, and at 50 % of RAM each they pinned all guest memory - the agent could no
  longer answer at all. The run must still end within timeout + 2 s, and with the mounts sized to
  leave the guest memory, the guest itself answers (no ``guest_unresponsive``).
- Stop the guest's vCPUs (QMP ``stop``, as a wedged or hostile guest would look): the agent never
  answers. The run must end within timeout + 2 s with ``timed_out``, the VM must be destroyed and
  the session closed, saying why on the next call.

The bounds are correctness bounds (the documented deadline), not speed benchmarks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from exec_sandbox.sandbox.lifecycle_errors import SessionClosedError
from exec_sandbox.sandbox.scheduler import Scheduler
from smartvm.process import pid_alive
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TIMEOUT_S = 5.0
DEADLINE_SLACK_S = 2.0

# Both tmpfs mounts, as full as they go (by small helper processes: the OOM killer, if it comes,
# picks one of them, not the sleeper), then sleep past the timeout.
FILL_TMP_THEN_SLEEP = r"""
import subprocess, time
subprocess.run(['sh', '-c', 'cat /dev/zero > /tmp/fill; cat /dev/zero > /dev/shm/fill; df -m /tmp /dev/shm'])
time.sleep(3600)
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests() as sched:
        yield sched


async def test_full_tmpfs_cannot_stretch_a_run_past_its_deadline(scheduler: Scheduler) -> None:
    started = time.monotonic()
    result = await scheduler.run(FILL_TMP_THEN_SLEEP, language="python", timeout_seconds=TIMEOUT_S)
    took = time.monotonic() - started
    assert result.timed_out and result.exit_code == -1, (result.stdout, result.stderr)
    assert not result.guest_unresponsive, result.stderr  # the guest kept enough memory to answer
    # Counted from the call, so admission, boot and the fill itself are inside the bound too.
    boot = result.timing.total_ms / 1000 - result.timing.execute_ms / 1000
    assert took - boot <= TIMEOUT_S + DEADLINE_SLACK_S, f"ran {took - boot:.1f}s for a {TIMEOUT_S:g}s timeout"
    await assert_no_vms(scheduler)


async def test_full_tmpfs_in_a_session_cannot_stretch_an_exec(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python") as s:
        started = time.monotonic()
        result = await s.exec(FILL_TMP_THEN_SLEEP, timeout_seconds=TIMEOUT_S)
        took = time.monotonic() - started
        assert result.timed_out and not result.guest_unresponsive, (result.stdout, result.stderr)
        assert took <= TIMEOUT_S + DEADLINE_SLACK_S, f"ran {took:.1f}s for a {TIMEOUT_S:g}s timeout"
        # The mounts are still full; the guest keeps working (a new interpreter starts and answers).
        follow_up = await s.exec("print('alive')", timeout_seconds=30)
        assert follow_up.stdout == "alive\n", follow_up.stderr
    await assert_no_vms(scheduler)


async def test_guest_that_stops_answering_is_cut_off_and_destroyed(scheduler: Scheduler) -> None:
    s = await scheduler.session(language="python")
    qemu_pid = s.vm.machine.pid
    assert qemu_pid is not None
    try:
        await s.exec("print('warm')")

        async def freeze_guest() -> None:
            await asyncio.sleep(1.0)
            await s.vm.machine.pause()  # QMP stop: no vCPU runs, the agent can never answer

        freezer = asyncio.create_task(freeze_guest())
        started = time.monotonic()
        result = await s.exec("import time\ntime.sleep(3600)", timeout_seconds=TIMEOUT_S)
        took = time.monotonic() - started
        await freezer
        assert result.timed_out and result.exit_code == -1, (result.stdout, result.stderr)
        assert result.guest_unresponsive
        assert "did not answer" in result.stderr
        assert took <= TIMEOUT_S + DEADLINE_SLACK_S, f"ran {took:.1f}s for a {TIMEOUT_S:g}s timeout"
        # The VM is destroyed (not left paused holding memory) and the session says why.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while pid_alive(qemu_pid) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert not pid_alive(qemu_pid), "the unresponsive guest's QEMU is still running"
        with pytest.raises(SessionClosedError) as info:
            await s.exec("print(1)")
        assert info.value.context["reason"] == "guest_unresponsive"
    finally:
        await s.close()
    await assert_no_vms(scheduler)
