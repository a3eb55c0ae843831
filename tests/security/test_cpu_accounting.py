"""Attack: hide CPU use behind an "idle" session.

Admission used to assume that a settled (idle) session uses no CPU. Guest code can leave work
running between calls - here a thread of the session's own interpreter, which legitimately
survives the exec - and so take CPU that admission hands out again. The VM's CPU is now measured
on the host (the QEMU process's utime + stime) and a session found burning counts as busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import VmCapacityError
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

BURN_IN_A_THREAD = r"""
import threading
def _burn():
    while True:
        pass
threading.Thread(target=_burn, daemon=True).start()
print('burning')
"""


class Meter:
    """A VM's CPU seconds as the host would read them; ``rate`` cores while time advances."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.rate = 0.0

    def advance(self, seconds: float) -> None:
        self.cpu += self.rate * seconds

    def __call__(self) -> float:
        return self.cpu


async def test_settled_grant_measured_burning_holds_its_cpu_again() -> None:
    ctrl = AdmissionController(10_000, 1.0, vm_overhead_mb=0, timeout_seconds=0.2,
                               cpu_sample_seconds=60)
    grant = await ctrl.acquire(256)
    meter = Meter()
    grant.settle()
    grant.meter_cpu(meter)
    assert ctrl.sample_cpu(0.0) == 0  # baseline
    meter.rate = 0.9
    meter.advance(1.0)
    assert ctrl.sample_cpu(1.0) == 1 and grant.burning and ctrl.stats().cpu_burning == 1
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(256)  # the one vCPU of the budget is really in use
    assert info.value.context["blocked_by"] == "cpu"
    # A waiter is granted as soon as a sample finds the session quiet again.
    waiter = asyncio.ensure_future(ctrl.acquire(256, timeout=30))
    await asyncio.sleep(0)
    assert not waiter.done()
    meter.rate = 0.001
    meter.advance(1.0)
    assert ctrl.sample_cpu(2.0) == 0 and not grant.burning
    second = await asyncio.wait_for(waiter, 5)
    second.release()
    grant.release()
    assert ctrl.stats().cpu_burning == 0 and ctrl.stats().active == 0


async def test_quiet_or_unmeasurable_grants_hold_no_cpu() -> None:
    ctrl = AdmissionController(10_000, 1.0, vm_overhead_mb=0, timeout_seconds=0.2,
                               cpu_sample_seconds=60)
    quiet = Meter()
    a = await ctrl.acquire(256)
    a.settle()
    a.meter_cpu(quiet)
    b = await ctrl.acquire(256)
    b.settle()
    b.meter_cpu(lambda: None)  # the VM is gone: nothing to count
    quiet.rate = 0.05
    for t in (0.0, 1.0, 2.0):
        quiet.advance(1.0)
        assert ctrl.sample_cpu(t) == 0
    c = await ctrl.acquire(256)
    c.release()
    a.release()
    b.release()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests(SchedulerConfig()) as sched:
        yield sched


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_idle_session_burning_cpu_is_counted_by_admission(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python") as quiet:
        r = await quiet.exec("x = sum(range(10**6))")
        assert r.cpu_seconds is not None and r.cpu_seconds > 0  # measured on the host
        async with await scheduler.session(language="python") as burner:
            await asyncio.sleep(2.5)  # a few samples with both idle
            assert scheduler.admission.stats().cpu_burning == 0
            r = await burner.exec(BURN_IN_A_THREAD)
            assert r.stdout == "burning\n", r.stderr
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while scheduler.admission.stats().cpu_burning < 1 and loop.time() < deadline:
                await asyncio.sleep(0.2)
            assert scheduler.admission.stats().cpu_burning == 1, scheduler.admission.stats()
            # Measured on the host, in one window: the burner takes CPU, the quiet session none.
            # (Relative, not "> 0.5 s per second": on a loaded 2-core host the burner's share of a
            # core is whatever the host scheduler gives it.)
            b0, q0 = burner.cpu_seconds(), quiet.cpu_seconds()
            await asyncio.sleep(2.0)
            b1, q1 = burner.cpu_seconds(), quiet.cpu_seconds()
            assert None not in (b0, b1, q0, q1)
            assert b1 - b0 > 0.25 and b1 - b0 > 10 * (q1 - q0), (b0, b1, q0, q1)
        # Closing the burning session gives its CPU back.
        assert scheduler.admission.stats().cpu_burning == 0
    await assert_no_vms(scheduler)
