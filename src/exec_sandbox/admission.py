"""Admission control: a memory and CPU budget that every VM must reserve from before it starts.

Budget (see :func:`compute_budget`)::

    memory_budget_mb = (min(host RAM, cgroup memory limit) - host_memory_reserve_mb) * memory_overcommit_ratio
    cpu_budget       = min(CPU affinity, cgroup CPU quota) * cpu_overcommit_ratio
    cost of one VM   = memory_mb + vm_overhead_mb  (QEMU + TCG translation cache),  vcpus

Waiting is strictly FIFO: a request that does not fit waits behind everything queued before it,
and a large request at the head of the queue also holds back smaller ones behind it that would
fit. That is deliberate: it keeps big VMs from starving under a stream of small ones, and it makes
waiting times predictable. Background work (warm-pool refills) uses :meth:`try_acquire`, which
never queues and never jumps the queue, so it cannot delay a foreground run.

A request larger than the whole budget fails at once with :class:`VmCapacityError`; a request
that does not get capacity within its timeout fails with :class:`VmCapacityError` (context:
``requested_mb``, ``available_mb``, ``budget_mb``, ``waited_ms`` and the CPU equivalents). A
waiter that is cancelled leaves the queue and takes nothing with it, even if capacity was granted
to it in the same instant.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from exec_sandbox.config import DEFAULT_VM_OVERHEAD_MB, SchedulerConfig
from exec_sandbox.errors import SandboxPermanentError, VmCapacityError
from exec_sandbox.host_resources import HostResources, probe_host_resources
from exec_sandbox.validation import input_error

__all__ = [
    "AdmissionController",
    "AdmissionState",
    "AdmissionStats",
    "Grant",
    "compute_budget",
]

_MIB: Final = 1024 * 1024
# CPU budgets are products of float ratios; compare with a little slack so 4 x 0.5 fits in 2.0.
_EPS: Final = 1e-9


def compute_budget(config: SchedulerConfig, resources: HostResources) -> tuple[int, float]:
    """``(memory_budget_mb, cpu_budget)`` for ``config`` on a host with ``resources``.

    Raises :class:`SandboxPermanentError` when the reserve leaves no memory for VMs.
    """
    host_mb = resources.memory_limit_bytes // _MIB
    usable_mb = host_mb - config.host_memory_reserve_mb
    if usable_mb <= 0:
        raise SandboxPermanentError(
            f"no memory left for VMs: the host allows {host_mb} MiB and host_memory_reserve_mb is "
            f"{config.host_memory_reserve_mb}",
            context={"host_memory_mb": host_mb, "host_memory_reserve_mb": config.host_memory_reserve_mb},
        )
    memory_budget = int(usable_mb * config.memory_overcommit_ratio)
    cpu_budget = resources.cpu_limit * config.cpu_overcommit_ratio
    return memory_budget, cpu_budget


class AdmissionState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class AdmissionStats:
    memory_budget_mb: int
    memory_in_use_mb: int
    cpu_budget: float
    cpu_in_use: int
    active: int  # grants held
    waiting: int  # requests queued
    waiting_memory_mb: int  # their total cost
    max_concurrent_vms: int | None
    granted_total: int
    timed_out_total: int
    rejected_total: int  # larger than the whole budget, or refused after close()

    @property
    def memory_available_mb(self) -> int:
        return self.memory_budget_mb - self.memory_in_use_mb


class Grant:
    """Capacity held for one VM. Release it exactly once (:meth:`release` is idempotent)."""

    def __init__(
        self, controller: AdmissionController, *, memory_mb: int, cost_mb: int, vcpus: int, waited_ms: float
    ) -> None:
        self._controller = controller
        self.memory_mb = memory_mb  # guest RAM asked for
        self.cost_mb = cost_mb  # what the budget is charged: guest RAM + per-VM overhead
        self.vcpus = vcpus
        self.waited_ms = waited_ms
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Grant(cost_mb={self.cost_mb}, vcpus={self.vcpus}, waited_ms={self.waited_ms:.1f}, {state})"


@dataclass(eq=False)
class _Waiter:
    memory_mb: int
    cost_mb: int
    vcpus: int
    started: float
    future: asyncio.Future[Grant]


class AdmissionController:
    """FIFO admission against a memory (MiB) and CPU (vCPU) budget; optional cap on the VM count.

    ::

        admission = AdmissionController.from_config(config)
        async with admission.reserve(memory_mb=256, vcpus=1) as grant:
            ...  # boot and run the VM; capacity is returned on exit, also on errors
    """

    def __init__(
        self,
        memory_budget_mb: int,
        cpu_budget: float,
        *,
        timeout_seconds: float | None = 60.0,
        vm_overhead_mb: int = DEFAULT_VM_OVERHEAD_MB,
        max_concurrent_vms: int | None = None,
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
        self.memory_budget_mb = memory_budget_mb
        self.cpu_budget = float(cpu_budget)
        self.timeout_seconds = _check_timeout("timeout_seconds", timeout_seconds)
        self.vm_overhead_mb = vm_overhead_mb
        self.max_concurrent_vms = max_concurrent_vms
        self._state = AdmissionState.OPEN
        self._memory_in_use = 0
        self._cpu_in_use = 0
        self._active = 0
        self._waiters: deque[_Waiter] = deque()
        self._granted_total = 0
        self._timed_out_total = 0
        self._rejected_total = 0

    @classmethod
    def from_config(
        cls, config: SchedulerConfig, resources: HostResources | None = None
    ) -> AdmissionController:
        """A controller sized from the host's real resources (probed now unless given)."""
        memory_budget, cpu_budget = compute_budget(config, resources or probe_host_resources())
        return cls(
            memory_budget,
            cpu_budget,
            timeout_seconds=config.admission_timeout_seconds,
            vm_overhead_mb=config.vm_overhead_mb,
            max_concurrent_vms=config.max_concurrent_vms,
        )

    @property
    def state(self) -> AdmissionState:
        return self._state

    def cost_mb(self, memory_mb: int) -> int:
        """What one VM with ``memory_mb`` of guest RAM is charged."""
        return memory_mb + self.vm_overhead_mb

    def max_vms(self, memory_mb: int, vcpus: int = 1) -> int:
        """How many VMs of this size the whole budget admits at once (for sizing pools)."""
        cost = self._check_request(memory_mb, vcpus)
        count = min(self.memory_budget_mb // cost, int((self.cpu_budget + _EPS) // vcpus))
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
        if self._has_waiters() or not self._fits(cost, vcpus):
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
        if not self._has_waiters() and self._fits(cost, vcpus):
            return self._grant(memory_mb, cost, vcpus, 0.0)
        loop = asyncio.get_running_loop()
        if wait == 0:
            self._timed_out_total += 1
            raise self._timeout_error(memory_mb, cost, vcpus, 0.0)
        waiter = _Waiter(memory_mb, cost, vcpus, loop.time(), loop.create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                return await waiter.future
        except TimeoutError:
            # Granted in the same instant the deadline hit: the grant is valid, keep it.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                return waiter.future.result()
            self._forget(waiter)
            self._timed_out_total += 1
            raise self._timeout_error(memory_mb, cost, vcpus, (loop.time() - waiter.started) * 1000) from None
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

    def _fits(self, cost: int, vcpus: int) -> bool:
        if self.max_concurrent_vms is not None and self._active >= self.max_concurrent_vms:
            return False
        return (
            self._memory_in_use + cost <= self.memory_budget_mb
            and self._cpu_in_use + vcpus <= self.cpu_budget + _EPS
        )

    def _grant(self, memory_mb: int, cost: int, vcpus: int, waited_ms: float) -> Grant:
        self._memory_in_use += cost
        self._cpu_in_use += vcpus
        self._active += 1
        self._granted_total += 1
        return Grant(self, memory_mb=memory_mb, cost_mb=cost, vcpus=vcpus, waited_ms=waited_ms)

    def _release(self, grant: Grant) -> None:
        self._memory_in_use -= grant.cost_mb
        self._cpu_in_use -= grant.vcpus
        self._active -= 1
        self._wake()

    def _wake(self) -> None:
        """Grant from the head of the queue while the head fits (strict FIFO: stop at the first misfit)."""
        if not self._waiters:
            return
        now = asyncio.get_running_loop().time()
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled / timed out, not yet removed
                self._waiters.popleft()
                continue
            if not self._fits(head.cost_mb, head.vcpus):
                return
            self._waiters.popleft()
            head.future.set_result(
                self._grant(head.memory_mb, head.cost_mb, head.vcpus, (now - head.started) * 1000)
            )

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        # The departed waiter may have been the head blocking others that fit now.
        if self._state is AdmissionState.OPEN:
            self._wake()

    def _timeout_error(self, memory_mb: int, cost: int, vcpus: int, waited_ms: float) -> VmCapacityError:
        free = self.memory_budget_mb - self._memory_in_use
        queued = len([w for w in self._waiters if not w.future.done()])
        return self._error(
            f"no capacity for a VM with {memory_mb} MiB and {vcpus} vCPU(s) within the admission timeout "
            f"({waited_ms:.0f} ms waited; {free} of {self.memory_budget_mb} MiB free, {queued} queued ahead)",
            memory_mb,
            cost,
            vcpus,
            waited_ms,
            reason="timeout",
        )

    def _error(
        self, message: str, memory_mb: int, cost: int, vcpus: int, waited_ms: float, *, reason: str
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
        }
        return VmCapacityError(message, context=context)


def _check_timeout(field: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise input_error(field, value, "must be a non-negative number of seconds or None")
    return None if math.isinf(value) else float(value)
