"""What admission control hands out and reports: :class:`Grant` (capacity held for one VM), the budget
a host allows (:func:`compute_budget`) and the :class:`AdmissionStats` snapshot. The controller that
queues and grants is :mod:`exec_sandbox.sandbox.admission`.

How a grant holds CPU (issue 5: >= 200 idle sandboxes on 24 GiB):

* **An idle VM costs memory, not CPU.** A restored, idle TCG guest uses ~0 % of a core (measured
  0.0-0.2 %); CPU contention comes from VMs that boot/restore or run code. So a grant holds its
  ``vcpus`` only while *busy*: from admission until :meth:`Grant.settle` (the Scheduler settles a
  session's VM once it is up and waiting for calls; a one-shot run stays busy until it is released).
  ``cpu_overcommit_ratio`` therefore bounds concurrent starts and one-shot runs - FIFO, with the
  timeout - not how many sessions may exist.
* **...but idle is measured, not assumed.** Guest code can leave work running in an idle session
  (a thread of its interpreter, a timer). A settled grant with a CPU meter (:meth:`Grant.meter_cpu`,
  the Scheduler attaches its VM's QEMU process CPU time read from ``/proc``) is sampled every
  ``cpu_sample_seconds``; while it used at least ``burning_cpu_fraction`` of a core over the last
  interval it counts its ``vcpus`` against the CPU budget again, exactly like a busy grant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.host.capacity import HostResources

__all__ = [
    "AdmissionState",
    "AdmissionStats",
    "Grant",
    "GrantOwner",
    "MemoryProbe",
    "compute_budget",
]

log = logging.getLogger(__name__)


MemoryProbe = Callable[[], int]
"""Returns the bytes that can be taken right now without swapping (e.g. :class:`MemoryHeadroomProbe`)."""


MIB: Final = 1024 * 1024


def compute_budget(config: SchedulerConfig, resources: HostResources) -> tuple[int, float]:
    """``(memory_budget_mb, cpu_budget)`` for ``config`` on a host with ``resources``.

    Raises :class:`SandboxPermanentError` when the reserve leaves no memory for VMs.
    """
    host_mb = resources.memory_limit_bytes // MIB
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
    busy: int = 0  # grants holding CPU (starting, or running a one-shot run)
    starting_memory_mb: int = 0  # start footprints of grants not settled yet (live guard)
    live_available_mb: int | None = None  # host headroom at the last decision (None: no live guard)
    live_guard_waits_total: int = 0  # times the queue head waited on the live guard alone
    cpu_burning: int = 0  # vCPUs of settled grants measured busy at the last CPU sample

    @property
    def memory_available_mb(self) -> int:
        return self.memory_budget_mb - self.memory_in_use_mb


class GrantOwner(Protocol):
    """What a :class:`Grant` reports back to: the
    :class:`~exec_sandbox.sandbox.admission.AdmissionController`."""

    def _metered(self, grant: Grant) -> None: ...

    def _settle(self, grant: Grant) -> None: ...

    def _release(self, grant: Grant) -> None: ...


class Grant:
    """Capacity held for one VM. Release it exactly once (:meth:`release` is idempotent).

    A new grant is *busy*: it holds its ``vcpus`` and its start footprint counts against the live
    guard. :meth:`settle` (idempotent) makes it *idle*: the CPU goes back to the queue and the VM's
    memory is from then on seen in the host's real headroom instead of estimated. The committed
    memory (``cost_mb``) is held until :meth:`release`.
    """

    def __init__(
        self,
        controller: GrantOwner,
        *,
        memory_mb: int,
        cost_mb: int,
        vcpus: int,
        waited_ms: float,
        start_footprint_mb: int = 0,
    ) -> None:
        self._controller = controller
        self.memory_mb = memory_mb  # guest RAM asked for
        self.cost_mb = cost_mb  # what the budget is charged: guest RAM + per-VM overhead
        self.vcpus = vcpus
        self.waited_ms = waited_ms
        self.start_footprint_mb = start_footprint_mb  # counted by the live guard until settled
        self._released = False
        self._settled = False
        self._meter: Callable[[], float | None] | None = None
        self._cpu_sample: tuple[float, float] | None = None  # (loop time, CPU seconds)
        self.burning = False  # settled, and measured using CPU at the last sample
        self.cpu_rate: float | None = None  # cores used over the last sample interval

    def meter_cpu(self, meter: Callable[[], float | None]) -> None:
        """Measure this VM's CPU while it is settled: ``meter()`` returns the CPU seconds it has
        used so far (None: unknown). An idle VM found burning CPU counts against the CPU budget."""
        if not self._released:
            self._meter = meter
            self._controller._metered(self)

    @property
    def released(self) -> bool:
        return self._released

    @property
    def settled(self) -> bool:
        """True once the VM went idle (:meth:`settle`) or the grant was released."""
        return self._settled

    def settle(self) -> None:
        """The VM is up and idle: give its CPU back and stop estimating its start footprint."""
        if not self._settled and not self._released:
            self._settled = True
            self._controller._settle(self)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self)

    def __repr__(self) -> str:
        state = "released" if self._released else ("idle" if self._settled else "busy")
        return f"Grant(cost_mb={self.cost_mb}, vcpus={self.vcpus}, waited_ms={self.waited_ms:.1f}, {state})"


@dataclass(eq=False)
class Waiter:
    memory_mb: int
    cost_mb: int
    vcpus: int
    started: float
    future: asyncio.Future[Grant]
    blocked_by: str = "queue"
