"""Admission control: the memory and CPU every VM must reserve before it starts.

Three checks, all of which a request must pass (see :meth:`AdmissionController.acquire`)::

    commit (worst case)  sum(memory_mb + vm_overhead_mb) of held grants
                           <= (min(host RAM, cgroup limit) - host_memory_reserve_mb) * memory_overcommit_ratio
    CPU (busy VMs)       sum(vcpus) of grants that are *busy* (starting, or running a one-shot run)
                         + sum(vcpus) of settled grants *measured* burning CPU (see below)
                           <= min(CPU affinity, cgroup CPU quota) * cpu_overcommit_ratio
    live memory guard    host headroom now (MemAvailable, and every memory-limited cgroup level's
                         limit - working set) - start footprints of VMs not yet settled - this VM's
                         start footprint >= host_memory_reserve_mb

Why this shape (issue 5: >= 200 idle sandboxes on 24 GiB without ever pushing the host into swap
or an OOM kill):

* **An idle VM costs memory, not CPU - and idle is measured, not assumed**: see
  :mod:`exec_sandbox.sandbox.grants` (busy and settled grants, CPU meters).
* **Committed memory is over-committed on purpose, and the real memory is guarded live.** Charging
  every VM its full guest RAM (+ overhead) as if it were resident admits ~70 VMs of 256 MiB on
  24 GiB, while an idle restored one really holds ~25-35 MiB (PSS; guest RAM is a private mapping
  of the snapshot file: only pages the guest writes after the restore become its own). So the commit
  check allows ``memory_overcommit_ratio`` (default 4) times the usable RAM, and the *live guard*
  refuses (queues) any start that would take the host's real headroom - read from ``/proc/meminfo``
  and the cgroup files at each decision, not estimated - below ``host_memory_reserve_mb``. A VM that
  is starting is counted at ``start_footprint_mb`` (capped at its own cost) until it settles,
  because its memory is not yet visible in MemAvailable when the next request is decided.
  While the queue head waits only on the live guard, it is re-checked every
  ``live_poll_seconds`` (memory freed by other processes wakes nobody).
* **What admission cannot do:** stop already admitted guests from growing into their RAM. The
  commit check bounds that worst case (``ratio`` x usable RAM); with ``ratio`` > 1 the rest is
  bounded per VM by its cgroup ``memory.max`` where the host delegates the memory controller, and
  by the guest's own RAM size. Set ``memory_overcommit_ratio=1`` for a strict, never-overcommitted
  budget.

Waiting is strictly FIFO: a request that does not fit waits behind everything queued before it,
and a large request at the head of the queue also holds back smaller ones behind it that would
fit. That is deliberate: it keeps big VMs from starving under a stream of small ones, and it makes
waiting times predictable. Background work (warm-pool refills) uses :meth:`try_acquire`, which
never queues and never jumps the queue, so it cannot delay a foreground run.

A request larger than the whole budget fails at once with :class:`VmCapacityError`; a request
that does not get capacity within its timeout fails with :class:`VmCapacityError` (context:
``reason``, ``blocked_by`` - ``memory``, ``cpu``, ``live_memory``, ``max_concurrent_vms`` or
``queue`` - ``requested_mb``, ``available_mb``, ``budget_mb``, ``live_available_mb``, ``waited_ms``
and the CPU equivalents). A waiter that is cancelled leaves the queue and takes nothing with it,
even if capacity was granted to it in the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from exec_sandbox.config import DEFAULT_VM_OVERHEAD_MB, DEFAULT_VM_START_FOOTPRINT_MB, SchedulerConfig
from exec_sandbox.errors import VmCapacityError
from exec_sandbox.host.capacity import HostResources, MemoryHeadroomProbe, probe_host_resources
from exec_sandbox.sandbox.grants import (
    MIB,
    AdmissionState,
    AdmissionStats,
    Grant,
    MemoryProbe,
    Waiter,
    compute_budget,
)
from exec_sandbox.validation import input_error

__all__ = ["AdmissionController"]


log = logging.getLogger(__name__)

# CPU budgets are products of float ratios; compare with a little slack so 4 x 0.5 fits in 2.0.
_EPS: Final = 1e-9
DEFAULT_LIVE_POLL_SECONDS: Final = 0.2
# Idle VMs' CPU: read every second; a settled VM using >= a quarter of a core counts as busy.
DEFAULT_CPU_SAMPLE_SECONDS: Final = 1.0
DEFAULT_BURNING_CPU_FRACTION: Final = 0.25


class AdmissionController:
    """FIFO admission against a memory (MiB) and CPU (vCPU) budget, an optional cap on the VM count
    and an optional live guard on the host's real memory (see the module docstring).

    ::

        admission = AdmissionController.from_config(config)
        async with admission.reserve(memory_mb=256, vcpus=1) as grant:
            ...  # boot the VM
            grant.settle()  # idle from here on (a session): its CPU goes back to the queue
            ...  # capacity is returned on exit, also on errors

    ``memory_probe`` (bytes free now; None = no live guard) is called at each decision;
    ``host_memory_reserve_mb`` is what it must leave free, ``start_footprint_mb`` what a VM that has
    not settled yet is assumed to take (capped at its cost).
    """

    def __init__(
        self,
        memory_budget_mb: int,
        cpu_budget: float,
        *,
        timeout_seconds: float | None = 60.0,
        vm_overhead_mb: int = DEFAULT_VM_OVERHEAD_MB,
        max_concurrent_vms: int | None = None,
        memory_probe: MemoryProbe | None = None,
        host_memory_reserve_mb: int = 0,
        start_footprint_mb: int = DEFAULT_VM_START_FOOTPRINT_MB,
        live_poll_seconds: float = DEFAULT_LIVE_POLL_SECONDS,
        cpu_sample_seconds: float = DEFAULT_CPU_SAMPLE_SECONDS,
        burning_cpu_fraction: float = DEFAULT_BURNING_CPU_FRACTION,
    ) -> None:
        if (
            isinstance(memory_budget_mb, bool)
            or not isinstance(memory_budget_mb, int)
            or memory_budget_mb < 1
        ):
            raise input_error("memory_budget_mb", memory_budget_mb, "must be a positive int (MiB)")
        if isinstance(cpu_budget, bool) or not isinstance(cpu_budget, (int, float)) or not cpu_budget > 0:
            raise input_error("cpu_budget", cpu_budget, "must be a positive number of vCPUs")
        if isinstance(vm_overhead_mb, bool) or not isinstance(vm_overhead_mb, int) or vm_overhead_mb < 0:
            raise input_error("vm_overhead_mb", vm_overhead_mb, "must be a non-negative int (MiB)")
        if max_concurrent_vms is not None and (
            isinstance(max_concurrent_vms, bool)
            or not isinstance(max_concurrent_vms, int)
            or max_concurrent_vms < 1
        ):
            raise input_error("max_concurrent_vms", max_concurrent_vms, "must be a positive int or None")
        if memory_probe is not None and not callable(memory_probe):
            raise input_error("memory_probe", memory_probe, "must be a callable returning bytes, or None")
        for name, value in (
            ("host_memory_reserve_mb", host_memory_reserve_mb),
            ("start_footprint_mb", start_footprint_mb),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise input_error(name, value, "must be a non-negative int (MiB)")
        if (
            isinstance(live_poll_seconds, bool)
            or not isinstance(live_poll_seconds, (int, float))
            or not 0 < live_poll_seconds <= 60
        ):
            raise input_error("live_poll_seconds", live_poll_seconds, "must be a number in (0, 60]")
        if (
            isinstance(cpu_sample_seconds, bool)
            or not isinstance(cpu_sample_seconds, (int, float))
            or not 0 < cpu_sample_seconds <= 60
        ):
            raise input_error("cpu_sample_seconds", cpu_sample_seconds, "must be a number in (0, 60]")
        if (
            isinstance(burning_cpu_fraction, bool)
            or not isinstance(burning_cpu_fraction, (int, float))
            or not 0 < burning_cpu_fraction <= 64
        ):
            raise input_error("burning_cpu_fraction", burning_cpu_fraction, "must be cores in (0, 64]")
        self.memory_budget_mb = memory_budget_mb
        self.cpu_budget = float(cpu_budget)
        self.timeout_seconds = _check_timeout("timeout_seconds", timeout_seconds)
        self.vm_overhead_mb = vm_overhead_mb
        self.max_concurrent_vms = max_concurrent_vms
        self.memory_probe = memory_probe
        self.host_memory_reserve_mb = host_memory_reserve_mb
        self.start_footprint_mb = start_footprint_mb
        self.live_poll_seconds = float(live_poll_seconds)
        self.cpu_sample_seconds = float(cpu_sample_seconds)
        self.burning_cpu_fraction = float(burning_cpu_fraction)
        self._meters: set[Grant] = set()
        self._burning_vcpus = 0
        self._cpu_timer: asyncio.TimerHandle | None = None
        self._state = AdmissionState.OPEN
        self._memory_in_use = 0
        self._cpu_in_use = 0
        self._active = 0
        self._busy = 0
        self._starting_mb = 0
        self._live_mb: int | None = None  # headroom at the last decision
        self._live_waits_total = 0
        self._poll: asyncio.TimerHandle | None = None
        self._waiters: deque[Waiter] = deque()
        self._granted_total = 0
        self._timed_out_total = 0
        self._rejected_total = 0

    @classmethod
    def from_config(
        cls,
        config: SchedulerConfig,
        resources: HostResources | None = None,
        *,
        memory_probe: MemoryProbe | None = None,
    ) -> AdmissionController:
        """A controller sized from the host's real resources (probed now unless given).

        With ``config.admission_live_memory_guard`` (default on) the live guard reads
        ``memory_probe``, by default a :class:`MemoryHeadroomProbe` of this host and its cgroups.
        """
        memory_budget, cpu_budget = compute_budget(config, resources or probe_host_resources())
        probe: MemoryProbe | None = None
        if config.admission_live_memory_guard:
            probe = memory_probe if memory_probe is not None else MemoryHeadroomProbe()
        return cls(
            memory_budget,
            cpu_budget,
            timeout_seconds=config.admission_timeout_seconds,
            vm_overhead_mb=config.vm_overhead_mb,
            max_concurrent_vms=config.max_concurrent_vms,
            memory_probe=probe,
            host_memory_reserve_mb=config.host_memory_reserve_mb,
            start_footprint_mb=config.vm_start_footprint_mb,
        )

    @property
    def state(self) -> AdmissionState:
        return self._state

    def cost_mb(self, memory_mb: int) -> int:
        """What one VM with ``memory_mb`` of guest RAM is charged."""
        return memory_mb + self.vm_overhead_mb

    def start_footprint(self, memory_mb: int) -> int:
        """What the live guard counts for one VM with ``memory_mb`` until it settles."""
        return min(self.cost_mb(memory_mb), self.start_footprint_mb)

    def max_vms(self, memory_mb: int, vcpus: int = 1) -> int:
        """How many VMs of this size may *start* (or run one-shot) at once: memory, CPU and the cap
        together (for sizing pools of per-start resources such as overlays)."""
        self._check_request(memory_mb, vcpus)
        return min(self.max_idle_vms(memory_mb), int((self.cpu_budget + _EPS) // vcpus))

    def max_idle_vms(self, memory_mb: int) -> int:
        """How many settled (idle) VMs of this size the commit budget and the cap allow at once.
        The live guard may allow fewer: it depends on what the guests really use."""
        count = self.memory_budget_mb // self._check_request(memory_mb, 1)
        if self.max_concurrent_vms is not None:
            count = min(count, self.max_concurrent_vms)
        return count

    def stats(self) -> AdmissionStats:
        pending = [w for w in self._waiters if not w.future.done()]
        return AdmissionStats(
            memory_budget_mb=self.memory_budget_mb,
            memory_in_use_mb=self._memory_in_use,
            cpu_budget=self.cpu_budget,
            cpu_in_use=self._cpu_in_use,
            active=self._active,
            waiting=len(pending),
            waiting_memory_mb=sum(w.cost_mb for w in pending),
            max_concurrent_vms=self.max_concurrent_vms,
            granted_total=self._granted_total,
            timed_out_total=self._timed_out_total,
            rejected_total=self._rejected_total,
            busy=self._busy,
            starting_memory_mb=self._starting_mb,
            live_available_mb=self._live_mb,
            live_guard_waits_total=self._live_waits_total,
            cpu_burning=self._burning_vcpus,
        )

    @asynccontextmanager
    async def reserve(
        self, memory_mb: int, vcpus: int = 1, *, timeout: float | None = None
    ) -> AsyncIterator[Grant]:
        """Hold capacity for one VM for the duration of the block (released on exit, also on errors).

        ``timeout`` (seconds) overrides the controller's default; 0 means "only if free right now".
        """
        grant = await self.acquire(memory_mb, vcpus, timeout=timeout)
        try:
            yield grant
        finally:
            grant.release()

    def try_acquire(self, memory_mb: int, vcpus: int = 1) -> Grant | None:
        """A grant if capacity is free now and nobody is queued, else None. Never waits or queues."""
        cost = self._check_request(memory_mb, vcpus)
        if (
            self._state is AdmissionState.CLOSED
            or cost > self.memory_budget_mb
            or vcpus > self.cpu_budget + _EPS
        ):
            return None
        if self._has_waiters() or self._blocker(cost, vcpus, self._read_live()) is not None:
            return None
        return self._grant(memory_mb, cost, vcpus, 0.0)

    async def acquire(self, memory_mb: int, vcpus: int = 1, *, timeout: float | None = None) -> Grant:
        """Wait (FIFO) for capacity and return a :class:`Grant` the caller must release."""
        cost = self._check_request(memory_mb, vcpus)
        wait = self.timeout_seconds if timeout is None else _check_timeout("timeout", timeout)
        if self._state is AdmissionState.CLOSED:
            self._rejected_total += 1
            raise self._error(
                "the admission controller is closed", memory_mb, cost, vcpus, 0.0, reason="closed"
            )
        if cost > self.memory_budget_mb or vcpus > self.cpu_budget + _EPS:
            self._rejected_total += 1
            raise self._error(
                f"a VM with {memory_mb} MiB (+{self.vm_overhead_mb} MiB overhead) and {vcpus} vCPU(s) "
                f"can never fit the budget of {self.memory_budget_mb} MiB / {self.cpu_budget:g} vCPUs",
                memory_mb,
                cost,
                vcpus,
                0.0,
                reason="exceeds_budget",
            )
        blocked_by = "queue" if self._has_waiters() else self._blocker(cost, vcpus, self._read_live())
        if blocked_by is None:
            return self._grant(memory_mb, cost, vcpus, 0.0)
        loop = asyncio.get_running_loop()
        if wait == 0:
            self._timed_out_total += 1
            raise self._timeout_error(memory_mb, cost, vcpus, 0.0, blocked_by)
        waiter = Waiter(memory_mb, cost, vcpus, loop.time(), loop.create_future(), blocked_by)
        self._waiters.append(waiter)
        if blocked_by == "live_memory":
            self._live_waits_total += 1
            self._schedule_poll()
        try:
            async with asyncio.timeout(wait):
                return await waiter.future
        except TimeoutError:
            # Granted in the same instant the deadline hit: the grant is valid, keep it.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                return waiter.future.result()
            self._forget(waiter)
            self._timed_out_total += 1
            raise self._timeout_error(
                memory_mb, cost, vcpus, (loop.time() - waiter.started) * 1000, waiter.blocked_by
            ) from None
        except asyncio.CancelledError:
            # Capacity granted to a task that is being cancelled goes straight back.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                waiter.future.result().release()
            self._forget(waiter)
            raise

    def close(self) -> None:
        """Refuse new requests and fail queued ones (idempotent). Held grants stay valid until released."""
        if self._state is AdmissionState.CLOSED:
            return
        self._state = AdmissionState.CLOSED
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._cpu_timer is not None:
            self._cpu_timer.cancel()
            self._cpu_timer = None
        now = asyncio.get_running_loop().time() if self._waiters else 0.0
        while self._waiters:
            w = self._waiters.popleft()
            if not w.future.done():
                self._rejected_total += 1
                w.future.set_exception(
                    self._error(
                        "the admission controller closed while this request was waiting",
                        w.memory_mb,
                        w.cost_mb,
                        w.vcpus,
                        (now - w.started) * 1000,
                        reason="closed",
                    )
                )

    # ------------------------------------------------------------------ internals

    def _check_request(self, memory_mb: int, vcpus: int) -> int:
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 1:
            raise input_error("memory_mb", memory_mb, "must be a positive int (MiB)")
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
            raise input_error("vcpus", vcpus, "must be a positive int")
        return self.cost_mb(memory_mb)

    def _has_waiters(self) -> bool:
        return any(not w.future.done() for w in self._waiters)

    def _read_live(self) -> int | None:
        """The host's headroom now in MiB (None without a live guard, or when the probe fails:
        then this one decision rests on the commit and CPU checks alone, with a warning - a
        release must never raise, and refusing every VM because /proc is unreadable helps nobody)."""
        if self.memory_probe is None:
            return None
        try:
            self._live_mb = int(self.memory_probe()) // MIB
        except Exception as exc:
            log.warning("admission: cannot read the host's free memory (%r); live guard skipped once", exc)
            return None
        return self._live_mb

    def _blocker(self, cost: int, vcpus: int, live_mb: int | None) -> str | None:
        """Why a request of this size cannot be granted now (None: it can)."""
        if self.max_concurrent_vms is not None and self._active >= self.max_concurrent_vms:
            return "max_concurrent_vms"
        if self._memory_in_use + cost > self.memory_budget_mb:
            return "memory"
        if self._cpu_in_use + self._burning_vcpus + vcpus > self.cpu_budget + _EPS:
            return "cpu"
        if live_mb is not None:
            footprint = min(cost, self.start_footprint_mb)
            if live_mb - self._starting_mb - footprint < self.host_memory_reserve_mb:
                return "live_memory"
        return None

    def _grant(self, memory_mb: int, cost: int, vcpus: int, waited_ms: float) -> Grant:
        footprint = min(cost, self.start_footprint_mb)
        self._memory_in_use += cost
        self._cpu_in_use += vcpus
        self._busy += 1
        self._starting_mb += footprint
        self._active += 1
        self._granted_total += 1
        return Grant(
            self,
            memory_mb=memory_mb,
            cost_mb=cost,
            vcpus=vcpus,
            waited_ms=waited_ms,
            start_footprint_mb=footprint,
        )

    def _settle(self, grant: Grant) -> None:
        self._cpu_in_use -= grant.vcpus
        self._busy -= 1
        self._starting_mb -= grant.start_footprint_mb
        self._wake()

    def _release(self, grant: Grant) -> None:
        self._memory_in_use -= grant.cost_mb
        if grant in self._meters:
            self._meters.discard(grant)
            if grant.burning:
                grant.burning = False
                self._burning_vcpus -= grant.vcpus
        if not grant.settled:
            self._cpu_in_use -= grant.vcpus
            self._busy -= 1
            self._starting_mb -= grant.start_footprint_mb
        self._active -= 1
        self._wake()

    # ------------------------------------------------------------------ measured CPU of idle VMs

    def _metered(self, grant: Grant) -> None:
        self._meters.add(grant)
        grant._cpu_sample = None
        self._schedule_cpu_sample()

    def _schedule_cpu_sample(self) -> None:
        if self._cpu_timer is None and self._meters and self._state is AdmissionState.OPEN:
            with contextlib.suppress(RuntimeError):  # no running loop: sampled on the next call
                loop = asyncio.get_running_loop()
                self._cpu_timer = loop.call_later(self.cpu_sample_seconds, self._on_cpu_timer)

    def _on_cpu_timer(self) -> None:
        self._cpu_timer = None
        self.sample_cpu(asyncio.get_running_loop().time())
        self._schedule_cpu_sample()

    def sample_cpu(self, now: float) -> int:
        """Read every metered grant's CPU meter (``now``: a monotonic time, e.g. the loop's) and
        recount the vCPUs of settled grants that used at least ``burning_cpu_fraction`` of a core
        since their previous reading. Returns that count; wakes the queue when it fell."""
        before = self._burning_vcpus
        burning = 0
        for grant in list(self._meters):
            meter = grant._meter
            cpu: float | None = None
            if meter is not None:
                try:
                    cpu = meter()
                except Exception as exc:  # a meter must never break admission
                    log.debug("admission: CPU meter failed: %r", exc)
            prev = grant._cpu_sample
            if cpu is None:
                grant.burning, grant.cpu_rate, grant._cpu_sample = False, None, None
                continue
            grant._cpu_sample = (now, cpu)
            if prev is None or now <= prev[0]:
                continue  # the first reading only sets the baseline (keeps the last verdict)
            grant.cpu_rate = max(cpu - prev[1], 0.0) / (now - prev[0])
            grant.burning = grant.settled and grant.cpu_rate >= self.burning_cpu_fraction
        for grant in self._meters:
            if grant.burning:
                burning += grant.vcpus
        self._burning_vcpus = burning
        if burning < before:
            self._wake()
        return burning

    def _schedule_poll(self) -> None:
        """Re-check the queue head soon: memory freed outside this controller wakes nobody."""
        if self._poll is None and self._state is AdmissionState.OPEN:
            loop = asyncio.get_running_loop()
            self._poll = loop.call_later(self.live_poll_seconds, self._on_poll)

    def _on_poll(self) -> None:
        self._poll = None
        self._wake()

    def _wake(self) -> None:
        """Grant from the head of the queue while the head fits (strict FIFO: stop at the first misfit)."""
        if not self._waiters:
            return
        now = asyncio.get_running_loop().time()
        live: int | None = None
        live_read = False
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled / timed out, not yet removed
                self._waiters.popleft()
                continue
            if not live_read:  # one probe read per pass; grants below are counted in _starting_mb
                live, live_read = self._read_live(), True
            blocked_by = self._blocker(head.cost_mb, head.vcpus, live)
            if blocked_by is not None:
                if blocked_by == "live_memory":
                    if head.blocked_by != "live_memory":
                        self._live_waits_total += 1
                    self._schedule_poll()
                head.blocked_by = blocked_by
                return
            self._waiters.popleft()
            head.future.set_result(
                self._grant(head.memory_mb, head.cost_mb, head.vcpus, (now - head.started) * 1000)
            )

    def _forget(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        # The departed waiter may have been the head blocking others that fit now.
        if self._state is AdmissionState.OPEN:
            self._wake()

    def _timeout_error(
        self, memory_mb: int, cost: int, vcpus: int, waited_ms: float, blocked_by: str
    ) -> VmCapacityError:
        free = self.memory_budget_mb - self._memory_in_use
        queued = len([w for w in self._waiters if not w.future.done()])
        live = "" if self._live_mb is None else f", host headroom {self._live_mb} MiB"
        return self._error(
            f"no capacity for a VM with {memory_mb} MiB and {vcpus} vCPU(s) within the admission timeout "
            f"({waited_ms:.0f} ms waited, blocked by {blocked_by}; {free} of {self.memory_budget_mb} MiB "
            f"free{live}, {queued} queued ahead)",
            memory_mb,
            cost,
            vcpus,
            waited_ms,
            reason="timeout",
            blocked_by=blocked_by,
        )

    def _error(
        self,
        message: str,
        memory_mb: int,
        cost: int,
        vcpus: int,
        waited_ms: float,
        *,
        reason: str,
        blocked_by: str | None = None,
    ) -> VmCapacityError:
        context: dict[str, Any] = {
            "reason": reason,
            "requested_mb": cost,
            "requested_memory_mb": memory_mb,
            "vm_overhead_mb": self.vm_overhead_mb,
            "requested_vcpus": vcpus,
            "available_mb": self.memory_budget_mb - self._memory_in_use,
            "budget_mb": self.memory_budget_mb,
            "available_vcpus": self.cpu_budget - self._cpu_in_use,
            "cpu_budget": self.cpu_budget,
            "active": self._active,
            "waiting": len([w for w in self._waiters if not w.future.done()]),
            "waited_ms": round(waited_ms, 3),
            "busy": self._busy,
            "live_available_mb": self._live_mb,
            "host_memory_reserve_mb": self.host_memory_reserve_mb,
            "starting_memory_mb": self._starting_mb,
        }
        if blocked_by is not None:
            context["blocked_by"] = blocked_by
        return VmCapacityError(message, context=context)


def _check_timeout(field: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise input_error(field, value, "must be a non-negative number of seconds or None")
    return None if math.isinf(value) else float(value)
