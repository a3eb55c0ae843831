"""Issue 5 through the public API: warm pool hits, L1 snapshot restores, stale snapshots, fork,
admission queueing/timeouts, and clean closes mid-refill / mid-restore / mid-boot.

Real guests under TCG. One cold boot (module fixture) fills a private snapshot cache; the other
tests restore from it (or copy it), so only the stale-snapshot test pays for more cold boots.
Every Scheduler is closed inside :func:`speed_scheduler`, which then proves that no QEMU process,
no runtime file and no half-written snapshot remains. No test asserts on timing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import VmCapacityError
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError, SessionClosedError
from exec_sandbox.sandbox.scheduler import BACKGROUND_NICE, Scheduler, SchedulerState
from exec_sandbox.settings import Settings
from exec_sandbox.vm.snapshots import SnapshotCache
from smartvm.process import can_raise_priority
from tests.integration.test_scheduler_support import assert_closed_clean, assert_no_vms, qemu_children
from tests.support.procfs import thread_nices

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROBE = "import os, random; print(os.urandom(16).hex(), random.random())"


def snapshot_leftovers(snapshot_dir: Path) -> list[str]:
    """Half-written or half-deleted cache entries."""
    if not snapshot_dir.exists():
        return []
    return sorted(p.name for p in snapshot_dir.iterdir() if p.name.startswith((".tmp-", ".trash-")))


@asynccontextmanager
async def speed_scheduler(config: SchedulerConfig, snapshot_dir: Path) -> AsyncIterator[Scheduler]:
    """A started Scheduler (TCG) with its own runtime dir and the given snapshot cache dir; after
    the block it must be closed and have left nothing behind."""
    before = frozenset(pid for pid, _ in qemu_children())
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbp-", dir="/tmp"))
    try:
        scheduler = Scheduler(
            config,
            settings=Settings(force_emulation=True),
            runtime_dir=runtime_dir,
            snapshot_dir=snapshot_dir,
        )
        async with scheduler:
            yield scheduler
        assert scheduler.state is SchedulerState.CLOSED
        await assert_closed_clean(runtime_dir, ignore=before)
        assert snapshot_leftovers(snapshot_dir) == []
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def copy_cache(src: Path, dst: Path) -> Path:
    # cp keeps the guest RAM file sparse (copytree would write every zero).
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)
    return dst


async def wait_until(condition: object, timeout: float = 120.0, what: str = "condition") -> None:
    assert callable(condition)
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def filled_snapshots() -> AsyncIterator[Path]:
    """A snapshot cache dir holding the warm python guest saved by a Scheduler's first cold run."""
    root = Path(tempfile.mkdtemp(prefix="sbx-speed-", dir="/var/tmp"))
    try:
        async with speed_scheduler(SchedulerConfig(), root) as sched:
            result = await sched.run("print('cold')")
            assert (result.stdout, result.restored_from_snapshot, result.warm_pool_hit) == (
                "cold\n",
                False,
                False,
            )
            assert result.timing.boot_ms > 0 and result.timing.restore_ms is None
            cache = sched.snapshot_cache
            assert cache is not None
            await cache.wait_saved()
            assert cache.stats.cold_boots == 1 and cache.stats.saves == 1
            assert len(cache.entries()) == 1
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_later_runs_and_sessions_restore_from_the_snapshot_with_distinct_randomness(
    filled_snapshots: Path,
) -> None:
    async with speed_scheduler(SchedulerConfig(), filled_snapshots) as sched:
        runs = [await sched.run(PROBE) for _ in range(2)]
        for r in runs:
            assert r.exit_code == 0, r.stderr
            assert r.restored_from_snapshot and not r.warm_pool_hit
            assert r.timing.restore_ms is not None and r.timing.restore_ms > 0
        a, b = (r.stdout.split() for r in runs)
        assert a[0] != b[0], "os.urandom repeated across restored runs"
        assert a[1] != b[1], "random.random repeated across restored runs"
        assert runs[0].vm_id != runs[1].vm_id

        s1 = await sched.session()
        s2 = await sched.session()
        async with s1, s2:
            assert s1.restored_from_snapshot and s2.restored_from_snapshot
            x = (await s1.exec(PROBE)).stdout.split()
            y = (await s2.exec(PROBE)).stdout.split()
            assert x[0] != y[0] and x[1] != y[1], "restored session REPLs share randomness"
            await s1.exec("v = 1")
            assert (await s2.exec("print('v' in globals())")).stdout == "False\n"
        cache = sched.snapshot_cache
        assert cache is not None
        assert cache.stats.restores == 4 and cache.stats.cold_boots == 0
        await assert_no_vms(sched)


async def test_a_stale_or_corrupt_snapshot_is_never_used(filled_snapshots: Path, tmp_path: Path) -> None:
    snapshots = copy_cache(filled_snapshots, tmp_path / "snapshots")
    async with speed_scheduler(SchedulerConfig(), snapshots) as sched:
        cache = sched.snapshot_cache
        assert cache is not None
        (key,) = cache.entries()
        # Corrupt: same size, one byte changed -> the checksum catches it; the run cold-boots.
        vmstate = cache.entry_dir(key) / "snapshot" / "vmstate"
        data = bytearray(vmstate.read_bytes())
        data[len(data) // 2] ^= 0xFF
        vmstate.write_bytes(bytes(data))
        result = await sched.run("print(6 * 7)")
        assert (result.stdout, result.restored_from_snapshot) == ("42\n", False)
        assert cache.stats.corrupt_discarded == 1 and cache.stats.restores == 0
        await cache.wait_saved()
        assert cache.entries() == [key]  # re-saved under the same key by that cold boot

        # Stale: another guest size is another key; the python/256 MiB snapshot is not restored.
        other = await sched.run("print(open('/proc/meminfo').readline())", memory_mb=320)
        assert other.exit_code == 0 and not other.restored_from_snapshot
        total_kb = int(other.stdout.split()[1])
        assert total_kb > 256 * 1024, "the 320 MiB run got a guest of the cached 256 MiB size"
        await cache.wait_saved()
        assert len(cache.entries()) == 2 and key in cache.entries()
        again = await sched.run("print(1)")
        assert again.restored_from_snapshot  # the repaired entry is used again
        await assert_no_vms(sched)


async def test_warm_pool_hits_refill_and_drain(filled_snapshots: Path) -> None:
    async with speed_scheduler(SchedulerConfig(warm_pool_size=1), filled_snapshots) as sched:
        await sched.prewarm(["python"], timeout_seconds=120)
        pool = sched.warm_pool("python")
        assert pool is not None and pool.idle_count("python") == 1
        assert sched.admission.stats().active == 1  # the idle VM holds its capacity

        first = await sched.run(PROBE)
        assert first.exit_code == 0, first.stderr
        assert first.warm_pool_hit and first.restored_from_snapshot
        assert pool.stats.hits == 1
        assert first.timing.boot_ms == 0 and first.timing.admission_wait_ms == 0

        await sched.prewarm(["python"], timeout_seconds=120)  # refilled in the background
        second = await sched.run(PROBE)
        assert second.warm_pool_hit and second.vm_id != first.vm_id
        assert first.stdout.split()[0] != second.stdout.split()[0]

        await sched.prewarm(["python"], timeout_seconds=120)
        third = await sched.run("print('only this')")
        assert third.warm_pool_hit
        assert (third.stdout, third.stderr) == ("only this\n", "")  # nothing of the priming run

        await sched.prewarm(["python"], timeout_seconds=120)
        idle_vm = pool._slots["python"].idle[0].vm
        assert idle_vm.machine.pid is not None
        base = os.getpriority(os.PRIO_PROCESS, 0)
        background = min(base + BACKGROUND_NICE, 19) if can_raise_priority() else base
        assert set(thread_nices(idle_vm.machine.pid)) == {background}  # made in the background
        async with await sched.session() as s:
            assert s.warm_pool_hit and s.vm is idle_vm
            assert set(thread_nices(idle_vm.machine.pid)) == {base}  # serving a caller now
            await s.exec("y = 5")
            assert (await s.exec("print(y)")).stdout == "5\n"
        assert pool.stats.hits == 4 and pool.stats.created >= 4
        # Each refill waited for the run that emptied the pool to finish first.
        assert pool.stats.refill_waited_for_foreground >= 3
        # A size the pool does not hold is not served from it.
        await sched.prewarm(["python"], timeout_seconds=120)
        assert not (await sched.run("print(1)", memory_mb=pool.memory_mb + 64)).warm_pool_hit
    # Leaving the block drained the pool: speed_scheduler proved no VM or file is left.


async def test_fork_gives_an_independent_session(filled_snapshots: Path) -> None:
    async with speed_scheduler(SchedulerConfig(), filled_snapshots) as sched:
        parent = await sched.session(env_vars={"WHO": "parent"})
        await parent.exec("x = 1\ndef bump():\n    global x\n    x += 10\n")
        await parent.write_file("shared.txt", b"before the fork")
        child = await parent.fork()
        try:
            assert child is not parent and child.vm_id != parent.vm_id
            assert sched.active_sessions == 2 and sched.admission.stats().active == 2
            assert child.env_vars == {"WHO": "parent"}
            await parent.exec("x = 2")
            assert (await child.exec("print(x)")).stdout == "1\n"
            await child.exec("bump()")
            assert (await child.exec("print(x)")).stdout == "11\n"
            assert (await parent.exec("print(x)")).stdout == "2\n"
            await child.write_file("shared.txt", b"child version")
            await child.write_file("child_only.txt", b"c")
            assert await parent.read_file("shared.txt") == b"before the fork"
            assert "child_only.txt" not in {f.name for f in await parent.list_files()}
            p = (await parent.exec(PROBE)).stdout.split()
            c = (await child.exec(PROBE)).stdout.split()
            assert p[0] != c[0] and p[1] != c[1], "fork shares randomness"
            await parent.close()
            # The child lives on after its parent closed.
            assert (await child.exec("print(x + 1)")).stdout == "12\n"
            with pytest.raises(SessionClosedError):
                await parent.fork()
        finally:
            await parent.close()
            await child.close()
        assert sched.active_sessions == 0
        await assert_no_vms(sched)


async def test_admission_queues_fifo_and_times_out(filled_snapshots: Path) -> None:
    # One VM at a time; a short admission timeout.
    config = SchedulerConfig(max_concurrent_vms=1, admission_timeout_seconds=1.0)
    async with speed_scheduler(config, filled_snapshots) as sched:
        holder = await sched.session()
        with pytest.raises(VmCapacityError) as info:
            await sched.run("print('never')")
        assert info.value.context["reason"] == "timeout"
        with pytest.raises(VmCapacityError):
            await holder.fork()  # the clone needs its own capacity
        assert (await holder.exec("print('still fine')")).stdout == "still fine\n"
        await holder.close()
        assert sched.admission.stats().timed_out_total == 2
        await assert_no_vms(sched)

    config = SchedulerConfig(max_concurrent_vms=1, admission_timeout_seconds=120.0)
    async with speed_scheduler(config, filled_snapshots) as sched:
        holder = await sched.session()
        finished: list[str] = []

        async def run(name: str) -> None:
            result = await sched.run(f"print({name!r})")
            assert result.stdout == f"{name}\n" and result.timing.admission_wait_ms > 0
            finished.append(name)

        first = asyncio.create_task(run("first"))
        await wait_until(lambda: sched.admission.stats().waiting == 1, what="the first run to queue")
        second = asyncio.create_task(run("second"))
        await wait_until(lambda: sched.admission.stats().waiting == 2, what="the second run to queue")
        assert finished == []
        await holder.close()
        await asyncio.gather(first, second)
        assert finished == ["first", "second"]
        await assert_no_vms(sched)


async def test_close_mid_refill_leaks_nothing(filled_snapshots: Path) -> None:
    async with speed_scheduler(SchedulerConfig(warm_pool_size=2), filled_snapshots) as sched:
        await sched.prewarm(["python"], wait=False)
        pool = sched.warm_pool("python")
        assert pool is not None
        # A refill restoring its VM right now: QEMU runs, the VM is not in the pool yet.
        await wait_until(
            lambda: pool.refilling is not None and bool(qemu_children(include_daemon=False)),
            what="a refill in progress",
        )
        await sched.close()
        assert pool.idle_count() == 0 and sched.admission.stats().active == 0
    # speed_scheduler: no QEMU process, no runtime file, no half-written snapshot.


async def test_close_mid_restore_fails_the_run_clearly_and_leaks_nothing(filled_snapshots: Path) -> None:
    async with speed_scheduler(SchedulerConfig(), filled_snapshots) as sched:
        task = asyncio.create_task(sched.run("print('never')"))
        await wait_until(lambda: bool(qemu_children(include_daemon=False)), what="the restore to start")
        await sched.close()
        with pytest.raises(SchedulerClosedError):
            await task


async def test_close_mid_cold_boot_for_the_snapshot_leaks_nothing(tmp_path: Path) -> None:
    snapshots = tmp_path / "empty"
    async with speed_scheduler(SchedulerConfig(), snapshots) as sched:
        booting = asyncio.Event()
        task = asyncio.create_task(sched.run("print('never')", on_boot_log=lambda _: booting.set()))
        await asyncio.wait_for(booting.wait(), 120)
        await sched.close()
        with pytest.raises(SchedulerClosedError):
            await task
    assert SnapshotCache(snapshots).entries() == []
