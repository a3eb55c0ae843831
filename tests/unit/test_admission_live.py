"""Admission's idle/busy CPU accounting and its live memory guard, with real asyncio tasks and the
real MemoryHeadroomProbe reading a real meminfo file (rewritten by the test to move the host)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxInputError, VmCapacityError
from exec_sandbox.host.capacity import CgroupLimits, HostResources, MemoryHeadroomProbe
from exec_sandbox.sandbox.admission import AdmissionController
from tests.support.loop import until

MiB = 1024 * 1024
GiB = 1024 * MiB


class Host:
    """A /proc/meminfo the probe really reads; ``set_available`` moves MemAvailable."""

    def __init__(self, root: Path, available_mb: int, total_mb: int = 24 * 1024) -> None:
        self.root = root
        self.total_mb = total_mb
        self.set_available(available_mb)
        self.probe = MemoryHeadroomProbe(root)

    def set_available(self, available_mb: int) -> None:
        self.available_mb = available_mb
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meminfo").write_text(
            f"MemTotal:       {self.total_mb * 1024} kB\n"
            f"MemFree:        {available_mb * 1024 // 2} kB\n"
            f"MemAvailable:   {available_mb * 1024} kB\n"
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "proc", available_mb=1024 + 300)


def guarded(host: Host, **kwargs: object) -> AdmissionController:
    kwargs.setdefault("vm_overhead_mb", 60)
    kwargs.setdefault("timeout_seconds", 30.0)
    kwargs.setdefault("host_memory_reserve_mb", 1024)
    kwargs.setdefault("start_footprint_mb", 128)
    return AdmissionController(100_000, 100.0, memory_probe=host.probe, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- busy / idle CPU


async def test_settled_grants_hold_memory_but_no_cpu() -> None:
    ctrl = AdmissionController(10_000, 2.0, vm_overhead_mb=60, timeout_seconds=30.0)
    first = await ctrl.acquire(256)
    second = await ctrl.acquire(256)
    assert (ctrl.stats().cpu_in_use, ctrl.stats().busy) == (2, 2)
    third = asyncio.create_task(ctrl.acquire(256))
    await until(lambda: ctrl.stats().waiting == 1)
    first.settle()  # the first VM is up and idle: a start may proceed
    grant3 = await third
    stats = ctrl.stats()
    assert (stats.active, stats.busy, stats.cpu_in_use, stats.memory_in_use_mb) == (3, 2, 2, 3 * 316)
    assert first.settled and not first.released and repr(first).endswith("idle)")
    first.settle()  # idempotent: no second refund
    assert ctrl.stats().cpu_in_use == 2
    # Many idle VMs on a 2-vCPU budget: only memory limits them.
    second.settle()
    grant3.settle()
    idle = []
    for _ in range(20):
        g = await ctrl.acquire(256, timeout=0)
        g.settle()
        idle.append(g)
    assert ctrl.stats().active == 23 and ctrl.stats().cpu_in_use == 0
    for g in [first, second, grant3, *idle]:
        g.release()
        g.release()
    stats = ctrl.stats()
    assert (stats.active, stats.busy, stats.cpu_in_use, stats.memory_in_use_mb, stats.starting_memory_mb) == (
        0,
        0,
        0,
        0,
        0,
    )


async def test_settle_after_release_changes_nothing() -> None:
    ctrl = AdmissionController(10_000, 2.0, vm_overhead_mb=0)
    grant = await ctrl.acquire(100)
    grant.release()
    grant.settle()
    assert not grant.settled and ctrl.stats().cpu_in_use == 0 and ctrl.stats().busy == 0


def test_max_vms_counts_starts_and_max_idle_vms_counts_memory() -> None:
    ctrl = AdmissionController(23_128 * 4, 8.0, vm_overhead_mb=60)
    assert ctrl.max_vms(256) == 8  # concurrent starts: the CPU budget
    assert ctrl.max_idle_vms(256) == 292  # (24152 - 1024) x 4 / 316 on this kind of host
    assert AdmissionController(10_000, 8.0, max_concurrent_vms=5).max_idle_vms(64) == 5
    with pytest.raises(SandboxInputError):
        ctrl.max_idle_vms(0)


# --------------------------------------------------------------------------- live memory guard


async def test_live_guard_counts_starting_vms_and_queues(host: Host) -> None:
    ctrl = guarded(host)
    a = await ctrl.acquire(256)  # 1324 - 0 - 128 >= 1024
    b = await ctrl.acquire(256)  # 1324 - 128 - 128 >= 1024
    assert ctrl.stats().starting_memory_mb == 256 and ctrl.stats().live_available_mb == 1324
    c_task = asyncio.create_task(ctrl.acquire(256))  # 1324 - 256 - 128 < 1024
    await until(lambda: ctrl.stats().waiting == 1)
    assert ctrl.stats().live_guard_waits_total == 1
    # The first VM is up; the host now really shows its memory (40 MiB of it).
    host.set_available(1324 - 40)
    a.settle()  # 1284 - 128 - 128 >= 1024: granted on the settle
    c = await c_task
    assert ctrl.stats().starting_memory_mb == 256
    for g in (a, b, c):
        g.release()
    assert ctrl.stats().starting_memory_mb == 0 and ctrl.stats().active == 0


async def test_live_guard_footprint_is_capped_at_the_vm_cost(host: Host) -> None:
    ctrl = guarded(host, vm_overhead_mb=0)
    grants = [await ctrl.acquire(64, timeout=0) for _ in range(4)]  # 4 x 64 <= 300
    assert [g.start_footprint_mb for g in grants] == [64] * 4 and ctrl.start_footprint(64) == 64
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(64, timeout=0)  # 1324 - 256 - 64 < 1024
    assert info.value.context["blocked_by"] == "live_memory"
    for g in grants:
        g.release()


async def test_live_guard_wakes_on_memory_freed_elsewhere(host: Host) -> None:
    host.set_available(1024 + 100)  # not enough for one start footprint
    ctrl = guarded(host, live_poll_seconds=0.01)
    task = asyncio.create_task(ctrl.acquire(256))
    await until(lambda: ctrl.stats().waiting == 1)
    assert ctrl.stats().active == 0  # nothing is held, so no release will ever wake it
    host.set_available(4096)  # another process exited
    grant = await asyncio.wait_for(task, 30)
    assert ctrl.stats().live_available_mb == 4096
    grant.release()


async def test_live_guard_timeout_names_the_blocker(host: Host) -> None:
    host.set_available(1024 + 50)
    ctrl = guarded(host, live_poll_seconds=0.01)
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(256, timeout=0.05)
    ctx = info.value.context
    assert ctx["reason"] == "timeout" and ctx["blocked_by"] == "live_memory"
    assert ctx["live_available_mb"] == 1074 and ctx["host_memory_reserve_mb"] == 1024
    assert "live_memory" in info.value.message and "host headroom 1074 MiB" in info.value.message
    assert ctrl.stats().timed_out_total == 1 and ctrl.stats().waiting == 0


async def test_live_blocked_head_keeps_fifo_and_try_acquire_refuses(host: Host) -> None:
    host.set_available(1024 + 100)
    ctrl = guarded(host, live_poll_seconds=0.01, vm_overhead_mb=0)
    big = asyncio.create_task(ctrl.acquire(512))  # footprint 128 > 100: waits on the guard
    await until(lambda: ctrl.stats().waiting == 1)
    small = asyncio.create_task(ctrl.acquire(32))  # would fit (32 <= 100), but queues behind
    await until(lambda: ctrl.stats().waiting == 2)
    assert ctrl.try_acquire(16) is None  # background work never jumps the queue
    host.set_available(1024 + 200)
    first = await asyncio.wait_for(big, 30)
    second = await asyncio.wait_for(small, 30)
    assert first.waited_ms > 0 and second.memory_mb == 32
    # Alone and without enough headroom, try_acquire still refuses.
    first.release()
    second.release()
    host.set_available(1024 + 10)
    assert ctrl.try_acquire(256) is None
    host.set_available(1024 + 500)
    grant = ctrl.try_acquire(256)
    assert grant is not None
    grant.release()


async def test_cancelled_live_waiter_and_close_leave_nothing(host: Host) -> None:
    host.set_available(1024)
    ctrl = guarded(host, live_poll_seconds=0.01)
    task = asyncio.create_task(ctrl.acquire(256))
    await until(lambda: ctrl.stats().waiting == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctrl.stats().waiting == 0 and ctrl.stats().active == 0
    waiting = asyncio.create_task(ctrl.acquire(256))
    await until(lambda: ctrl.stats().waiting == 1)
    ctrl.close()
    with pytest.raises(VmCapacityError) as info:
        await waiting
    assert info.value.context["reason"] == "closed"
    assert ctrl._poll is None  # the re-check timer does not outlive the controller


async def test_failing_probe_skips_the_guard_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = Host(tmp_path / "proc", available_mb=4096)
    ctrl = guarded(host)
    (host.root / "meminfo").unlink()  # /proc unreadable: decide on the budget alone
    with caplog.at_level(logging.WARNING, logger="exec_sandbox.sandbox.admission"):
        grant = await ctrl.acquire(256, timeout=0)
        grant.release()  # a release never raises, even with the probe broken
    assert "live guard skipped" in caplog.text


# --------------------------------------------------------------------------- from_config


def resources() -> HostResources:
    return HostResources(
        memory_total_bytes=24152 * MiB, memory_available_bytes=23000 * MiB, cpu_count=2, cgroup=CgroupLimits()
    )


async def test_from_config_defaults_admit_200_idle_vms_of_the_default_size(host: Host) -> None:
    config = SchedulerConfig()
    host.set_available(23_500)
    ctrl = AdmissionController.from_config(config, resources(), memory_probe=host.probe)
    assert ctrl.memory_probe is host.probe and ctrl.host_memory_reserve_mb == 1024
    assert ctrl.start_footprint_mb == config.vm_start_footprint_mb == 128
    assert ctrl.cpu_budget == 8.0 and ctrl.max_idle_vms(256) >= 200
    grants = []
    for _ in range(200):  # opened one after another, each settling once up (what a session does)
        grant = await ctrl.acquire(config.default_memory_mb, config.default_vcpus, timeout=0)
        host.set_available(host.available_mb - 30)  # ~30 MiB really used per idle VM
        grant.settle()
        grants.append(grant)
    stats = ctrl.stats()
    assert (stats.active, stats.busy, stats.cpu_in_use, stats.starting_memory_mb) == (200, 0, 0, 0)
    for grant in grants:
        grant.release()


def test_from_config_without_the_guard() -> None:
    ctrl = AdmissionController.from_config(SchedulerConfig(admission_live_memory_guard=False), resources())
    assert ctrl.memory_probe is None and ctrl.stats().live_available_mb is None


def test_from_config_probes_this_host_by_default() -> None:
    ctrl = AdmissionController.from_config(SchedulerConfig(), resources())
    assert isinstance(ctrl.memory_probe, MemoryHeadroomProbe)
    assert ctrl.memory_probe() > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_probe": 5}, "memory_probe"),
        ({"host_memory_reserve_mb": -1}, "host_memory_reserve_mb"),
        ({"start_footprint_mb": 1.5}, "start_footprint_mb"),
        ({"live_poll_seconds": 0}, "live_poll_seconds"),
        ({"live_poll_seconds": True}, "live_poll_seconds"),
    ],
)
def test_bad_live_guard_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        AdmissionController(1000, 2.0, **kwargs)  # type: ignore[arg-type]
    assert info.value.context["field"] == field
