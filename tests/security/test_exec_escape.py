"""Attack: user code starts a process that outlives the exec that started it.

The classic escape from a process-group / session kill: fork, ``setsid`` in the child, fork again,
let the middle process exit (the grandchild is re-parented to init, in no group of ours) and spin
on the CPU. A hopper variant keeps forking and exiting so a /proc scan always finds a stale pid.
Real guests under TCG through the public Session API; the burner must be gone after the exec (seen
from a later exec in the same session) and the QEMU process must be idle afterwards (seen from the
host, whatever the guest reports).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.sandbox.session import Session
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Double fork + setsid; the grandchild closes every inherited fd (so nothing waits for its pipes),
# records its pid and spins. With HOP, it re-forks itself without pause (each parent exits at once),
# so the pid a /proc scan saw is gone by the time it is killed and a scan-and-kill loop gives up.
ESCAPE = r"""
import os, time
HOP = {hop}
try:
    os.unlink('/tmp/burner.pid')
except FileNotFoundError:
    pass
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 1024)
        written = 0.0
        while True:
            now = time.monotonic()
            if now - written > 0.02 or HOP:
                with open('/tmp/burner.pid.tmp', 'w') as f:
                    f.write(str(os.getpid()))
                os.rename('/tmp/burner.pid.tmp', '/tmp/burner.pid')
                written = now
            if HOP and os.fork() != 0:
                os._exit(0)
    os._exit(0)
os.waitpid(pid, 0)
while not os.path.exists('/tmp/burner.pid'):
    time.sleep(0.01)
print('started', open('/tmp/burner.pid').read())
{tail}
"""

# The burner's pid as it last wrote it (a hopper writes each new pid before it burns), if alive.
SURVIVORS = r"""
pid = int(open('/tmp/burner.pid').read())
try:
    state = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()[0]
except OSError:
    state = 'gone'
print([pid] if state not in ('gone', 'Z', 'X') else [])
"""

IDLE_WINDOW_S = 3.0
# An idle TCG guest uses ~0.1-0.2 % of a core; a spinning process ~100 %. A quarter of the window
# separates the two with room for a loaded host.
IDLE_CPU_BOUND_S = 0.25 * IDLE_WINDOW_S


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests() as sched:
        yield sched


async def user_processes(s: Session) -> list[int]:
    """The burner, if it is still alive."""
    r = await s.exec(SURVIVORS)
    assert r.exit_code == 0, r.stderr
    return [int(p) for p in r.stdout.strip(" []\n").split(",") if p.strip()]


async def idle_cpu_seconds(s: Session) -> float:
    """CPU the session's QEMU process used over IDLE_WINDOW_S of no calls, read from the host."""
    before = s.cpu_seconds()
    await asyncio.sleep(IDLE_WINDOW_S)
    after = s.cpu_seconds()
    assert before is not None and after is not None
    return after - before


@pytest.mark.parametrize("hop", [False, True], ids=["double-fork", "fork-hopper"])
async def test_burner_started_by_a_finished_exec_is_gone(scheduler: Scheduler, hop: bool) -> None:
    async with await scheduler.session(language="python") as s:
        r = await s.exec(ESCAPE.format(hop=hop, tail=""), timeout_seconds=30)
        assert r.exit_code == 0 and r.stdout.startswith("started"), r.stderr
        left = await user_processes(s)
        used = await idle_cpu_seconds(s)
        assert left == [], f"processes of the finished exec still alive: {left}"
        assert used < IDLE_CPU_BOUND_S, f"idle session used {used:.2f}s CPU in {IDLE_WINDOW_S}s"
        # The session itself is intact: its interpreter (and state) survived.
        await s.exec("x = 5")
        assert (await s.exec("print(x)")).stdout == "5\n"
    await assert_no_vms(scheduler)


async def test_burner_started_by_a_timed_out_exec_is_gone(scheduler: Scheduler) -> None:
    # A plain double fork was already caught after a timeout (orphans re-parented to the agent were
    # scanned for); the hopper outruns any scan-and-kill loop.
    async with await scheduler.session(language="python") as s:
        r = await s.exec(ESCAPE.format(hop=True, tail="time.sleep(3600)"), timeout_seconds=4)
        assert r.timed_out and "started" in r.stdout, (r.stdout, r.stderr)
        left = await user_processes(s)
        used = await idle_cpu_seconds(s)
        assert left == [], f"processes of the timed-out exec still alive: {left}"
        assert used < IDLE_CPU_BOUND_S, f"idle session used {used:.2f}s CPU in {IDLE_WINDOW_S}s"
    await assert_no_vms(scheduler)


async def test_user_code_cannot_leave_its_exec_group(scheduler: Scheduler) -> None:
    code = r"""
import os
print(open('/proc/self/cgroup').read().strip())
for target in ('/sys/fs/cgroup/cgroup.procs', '/sys/fs/cgroup/sbx/cgroup.procs'):
    try:
        with open(target, 'w') as f:
            f.write(str(os.getpid()))
        print('moved', target)
    except OSError as e:
        print('refused', target, e.errno)
try:
    os.mkdir('/sys/fs/cgroup/sbx/mine')
    print('made a group')
except OSError as e:
    print('mkdir refused', e.errno)
"""
    async with await scheduler.session(language="python") as s:
        r = await s.exec(code)
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("0::/sbx/exec-"), lines[0]  # a group of its own, made by root
        assert not any(line.startswith(("moved", "made")) for line in lines), lines
    await assert_no_vms(scheduler)
