"""Warm pool: ready, REPL-warm VMs per language, handed out in O(1) and refilled in the background.

Each idle VM holds the admission :class:`Grant` it was made under, so the pool is counted against
the host budget like any running VM; :meth:`WarmPool.checkout` hands the VM *and* its grant to the
caller (the grant is released by whoever retires the VM). VMs are single-use: nothing is ever
returned to the pool.

Refills run in one background task, up to ``refill_concurrency`` VMs at a time (default 1: on a
small host a second concurrent boot/restore competes with foreground runs for the CPU; raise it for
throughput), and take capacity only through
:meth:`AdmissionController.try_acquire` - which refuses while any foreground caller is queued - so
a refill never makes a foreground run wait; and when foreground callers do queue (for a language
or size the pool does not hold), idle VMs are closed to give their capacity back. Idle VMs are
health-checked (agent ping) every ``health_interval_s`` and on checkout - unless the agent was heard
from within ``checkout_ping_after_s`` (a round trip is ~3 ms under TCG, most of a pool hit); dead
ones are replaced.

Lifecycle::

    NEW --start()--> RUNNING --drain()/aclose()--> CLOSED      (drain is idempotent)

``drain`` cancels the refill and health tasks (a VM being booted is closed by its own cancellation
path), then closes every idle VM and releases its grant - nothing leaks, also mid-refill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Self

from exec_sandbox.errors import SandboxError, SandboxTransientError
from exec_sandbox.protocol.agent import Language
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.foreground import ForegroundActivity
from exec_sandbox.sandbox.grants import Grant
from exec_sandbox.vm.sandbox_vm import SandboxVm
from smartvm.cleanup import shielded

__all__ = [
    "PRIME_CODE",
    "PooledVm",
    "VmFactory",
    "WarmPool",
    "WarmPoolState",
    "WarmPoolStats",
]

logger = logging.getLogger(__name__)

VmFactory = Callable[[Language], Awaitable[SandboxVm]]
"""Makes one ready, REPL-warm VM of a language (e.g. ``SnapshotCache.restore_or_boot``)."""

# Run once in every new pooled VM, off the foreground path: under TCG a restored guest starts with an
# empty translation cache, so its first exec pays for translating the interpreter's code paths.
# Python's writes one byte so the output path (pipe, agent, frame) is translated too: the first
# run's median fell 16.3 -> 14.8 and 18.5 -> 15.8 ms in two interleaved A/B runs. The byte belongs
# to the priming request; the caller's run never sees it.
PRIME_CODE: dict[str, str] = {"python": "print(' ', end='')", "javascript": "0", "raw": "true"}


class WarmPoolState(StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True)
class PooledVm:
    """A checked-out VM and the admission grant it holds (None when the pool has no admission)."""

    vm: SandboxVm
    grant: Grant | None


@dataclass
class WarmPoolStats:
    hits: int = 0
    misses: int = 0
    created: int = 0
    create_failures: int = 0
    unhealthy_dropped: int = 0
    checkout_pings: int = 0  # health pings on checkout (skipped while the agent was heard recently)
    refill_deferred: int = 0  # no capacity right now (or foreground callers queued)
    refill_waited_for_foreground: int = 0  # a refill waited for a gap between foreground operations
    yielded: int = 0  # idle VMs closed so that queued foreground requests could get capacity


@dataclass
class _Slot:
    idle: deque[PooledVm] = field(default_factory=deque)


class WarmPool:
    """Keeps ``size_per_language`` ready VMs for each of ``languages``.

    ``factory(language)`` makes one VM (it must be REPL-warm and ready). ``memory_mb``/``vcpus``
    are what each pooled VM is charged against ``admission``. Failures of the factory are logged
    and retried after ``retry_delay_s`` (doubling up to ``max_retry_delay_s``).
    """

    def __init__(
        self,
        factory: VmFactory,
        size_per_language: int,
        admission: AdmissionController | None,
        *,
        languages: Iterable[Language],
        memory_mb: int,
        vcpus: int = 1,
        health_interval_s: float = 30.0,
        ping_timeout_s: float = 2.0,
        ping_on_checkout: bool = True,
        checkout_ping_after_s: float = 5.0,
        retry_delay_s: float = 0.5,
        max_retry_delay_s: float = 30.0,
        yield_poll_s: float = 0.25,
        prime: bool = True,
        refill_concurrency: int = 1,
        foreground: ForegroundActivity | None = None,
        max_refill_defer_s: float = 1.0,
    ) -> None:
        if size_per_language < 0:
            raise ValueError("size_per_language must be >= 0")
        if refill_concurrency < 1:
            raise ValueError("refill_concurrency must be >= 1")
        if max_refill_defer_s < 0:
            raise ValueError("max_refill_defer_s must be >= 0")
        if health_interval_s <= 0 or ping_timeout_s <= 0 or retry_delay_s <= 0 or checkout_ping_after_s < 0:
            raise ValueError(
                "health_interval_s, ping_timeout_s and retry_delay_s must be > 0, checkout_ping_after_s >= 0"
            )
        self._factory = factory
        self.size_per_language = size_per_language
        self._admission = admission
        self.languages: tuple[Language, ...] = tuple(dict.fromkeys(languages))
        self.memory_mb = memory_mb
        self.vcpus = vcpus
        self.health_interval_s = health_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.ping_on_checkout = ping_on_checkout
        self.checkout_ping_after_s = checkout_ping_after_s
        self.retry_delay_s = retry_delay_s
        self.max_retry_delay_s = max_retry_delay_s
        self.yield_poll_s = yield_poll_s
        self.prime = prime
        self.refill_concurrency = refill_concurrency
        # A refill starts in a gap between foreground operations, or after max_refill_defer_s.
        self._foreground = foreground
        self.max_refill_defer_s = max_refill_defer_s
        self.stats = WarmPoolStats()
        self._slots: dict[Language, _Slot] = {lang: _Slot() for lang in self.languages}
        self._state = WarmPoolState.NEW
        self._wakeup = asyncio.Event()
        self._refiller: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None
        self._building: dict[asyncio.Task[bool], Language] = {}

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> WarmPoolState:
        return self._state

    def idle_count(self, language: Language | None = None) -> int:
        if language is not None:
            slot = self._slots.get(language)
            return len(slot.idle) if slot is not None else 0
        return sum(len(s.idle) for s in self._slots.values())

    @property
    def refilling(self) -> Language | None:
        """The language of a VM being made right now, if any (the oldest such build)."""
        return next(iter(self._building.values()), None)

    @property
    def refills_in_flight(self) -> int:
        return len(self._building)

    def __repr__(self) -> str:
        idle = {lang: len(s.idle) for lang, s in self._slots.items()}
        return f"WarmPool(state={self._state.value!r}, idle={idle}, target={self.size_per_language})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the refill and health tasks. Idempotent; refused after :meth:`drain`."""
        if self._state is WarmPoolState.RUNNING:
            return
        if self._state is WarmPoolState.CLOSED:
            raise SandboxTransientError("the warm pool is closed and cannot be restarted")
        self._state = WarmPoolState.RUNNING
        if self.size_per_language == 0 or not self.languages:
            return
        loop = asyncio.get_running_loop()
        self._refiller = loop.create_task(self._refill_loop(), name="warm-pool-refill")
        self._health = loop.create_task(self._health_loop(), name="warm-pool-health")
        self._wakeup.set()

    async def drain(self) -> None:
        """Stop refilling, close every idle VM and release its grant. Idempotent, safe mid-refill."""
        if self._state is WarmPoolState.CLOSED:
            return
        self._state = WarmPoolState.CLOSED
        tasks = [t for t in (self._refiller, self._health) if t is not None]
        self._refiller = self._health = None
        for task in tasks:
            task.cancel()
        # Runs to its end even if we are cancelled meanwhile: a half-done drain leaks VMs and grants.
        await shielded(self._close_all(tasks))

    async def _close_all(self, tasks: list[asyncio.Task[None]]) -> None:
        # Each task closes what it was making when cancelled: wait for that before collecting the idle.
        if tasks:
            await asyncio.wait(tasks)
        idle = [pooled for slot in self._slots.values() for pooled in slot.idle]
        for slot in self._slots.values():
            slot.idle.clear()
        await asyncio.gather(*(self._dispose(p) for p in idle))

    async def aclose(self) -> None:
        await self.drain()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.drain()

    # ------------------------------------------------------------------ checkout

    async def checkout(self, language: Language) -> PooledVm | None:
        """A ready VM of ``language`` (with its grant), or None on a miss - the caller boots one.

        O(1): pops the oldest idle VM; a VM that fails its health check is dropped and the next one
        tried. The caller owns the VM and the grant from here on (close it, release the grant).
        """
        slot = self._slots.get(language)
        if self._state is not WarmPoolState.RUNNING or slot is None:
            self.stats.misses += 1
            return None
        try:
            while slot.idle:
                pooled = slot.idle.popleft()
                if await self._healthy(pooled.vm, on_checkout=True):
                    self.stats.hits += 1
                    return pooled
                self.stats.unhealthy_dropped += 1
                await self._dispose(pooled)
            self.stats.misses += 1
            return None
        finally:
            self._wakeup.set()

    async def _healthy(self, vm: SandboxVm, *, on_checkout: bool) -> bool:
        if not vm.alive:
            return False
        if on_checkout and not self.ping_on_checkout:
            return True
        heard = vm.agent.last_heard_at
        if on_checkout and heard is not None and time.monotonic() - heard < self.checkout_ping_after_s:
            return True
        if on_checkout:
            self.stats.checkout_pings += 1
        try:
            await vm.agent.ping(timeout=self.ping_timeout_s)
        except (SandboxError, TimeoutError) as exc:
            logger.warning("pooled VM %s failed its health check: %s", vm.vm_id, exc)
            return False
        return True

    async def _dispose(self, pooled: PooledVm) -> None:
        try:
            await pooled.vm.close()
        except Exception:
            logger.warning("closing pooled VM %s failed", pooled.vm.vm_id, exc_info=True)
        finally:
            if pooled.grant is not None:
                pooled.grant.release()

    # ------------------------------------------------------------------ refill

    def _next_language(self) -> Language | None:
        """The language furthest below target, counting VMs being made (ties: declaration order)."""
        building = list(self._building.values())
        best: tuple[int, Language] | None = None
        for lang in self.languages:
            missing = self.size_per_language - len(self._slots[lang].idle) - building.count(lang)
            if missing > 0 and (best is None or missing > best[0]):
                best = (missing, lang)
        return None if best is None else best[1]

    def _try_grant(self) -> tuple[bool, Grant | None]:
        if self._admission is None:
            return True, None
        grant = self._admission.try_acquire(self.memory_mb, self.vcpus)
        return grant is not None, grant

    async def _refill_loop(self) -> None:
        delay = self.retry_delay_s
        try:
            # Checked each turn as well as cancelled: a cancellation lost inside a library call
            # (asyncio.wait_for on 3.11 can drop one) must not leave drain() waiting for ever.
            while self._state is WarmPoolState.RUNNING:
                try:
                    await self._yield_to_waiters()
                except Exception:
                    logger.warning("warm pool could not give capacity back", exc_info=True)
                if len(self._building) >= self.refill_concurrency:
                    await self._wait_for_a_build()
                    continue
                language = self._next_language()
                if language is None:
                    if self._building:
                        await self._wait_for_a_build()
                        continue
                    # With admission, wake up now and then to notice foreground callers queueing.
                    await self._sleep_or_wakeup(self.yield_poll_s if self._admission is not None else None)
                    continue
                if self._foreground is not None and self._foreground.active:
                    # The run that just emptied the pool is still executing: making its
                    # replacement right now would compete with it for the host's cores.
                    self.stats.refill_waited_for_foreground += 1
                    await self._foreground.wait_for_gap(self.max_refill_defer_s)
                    if self._state is not WarmPoolState.RUNNING:
                        break
                ok, grant = self._try_grant()
                if not ok:
                    self.stats.refill_deferred += 1
                    await self._sleep_or_wakeup(self.retry_delay_s)
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._make_one(language, grant), name=f"warm-pool-make-{language}"
                )
                self._building[task] = language
                task.add_done_callback(self._build_done)
                if self.refill_concurrency == 1 or len(self._building) >= self.refill_concurrency:
                    if not await self._wait_for_a_build():
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self.max_retry_delay_s)
                    else:
                        delay = self.retry_delay_s
        finally:
            # Cancelled (drain): every build in flight closes what it made and releases its grant.
            builds = list(self._building)
            for task in builds:
                task.cancel()
            if builds:
                await asyncio.wait(builds)

    def _build_done(self, task: asyncio.Task[bool]) -> None:
        self._building.pop(task, None)
        self._wakeup.set()

    async def _wait_for_a_build(self) -> bool:
        """Wait until one build in flight finishes; its result (False: it failed)."""
        if not self._building:
            return True
        done, _ = await asyncio.wait(list(self._building), return_when=asyncio.FIRST_COMPLETED)
        return all(not t.cancelled() and t.exception() is None and t.result() for t in done)

    async def _make_one(self, language: Language, grant: Grant | None) -> bool:
        """Make one VM under ``grant``; on any failure or cancellation the grant is released."""
        vm: SandboxVm | None = None
        try:
            vm = await self._factory(language)
            if self.prime:
                await self._prime(vm)
        except asyncio.CancelledError:
            if grant is not None:
                grant.release()
            raise
        except Exception as exc:
            if grant is not None:
                grant.release()
            self.stats.create_failures += 1
            message = exc.message if isinstance(exc, SandboxError) else repr(exc)
            logger.warning("warm pool could not make a %s VM: %s", language, message)
            return False
        if self._state is not WarmPoolState.RUNNING:  # drained while the factory finished
            await self._dispose(PooledVm(vm, grant))
            return True
        self._slots[language].idle.append(PooledVm(vm, grant))
        self.stats.created += 1
        return True

    async def _prime(self, vm: SandboxVm) -> None:
        """Run a trivial block in the REPL and in the spare one-shot interpreter (which is kept: a
        replacement would cost 250-700 ms of guest CPU), so that the translations a run needs exist
        before a caller gets the VM."""
        try:
            for session in (True, False):
                result = await vm.exec(
                    PRIME_CODE[vm.language], language=vm.language, session=session, timeout_s=60.0,
                    prime_spare=not session, refill_spare=False,
                )
                if result.exit_code != 0:
                    raise SandboxTransientError(
                        f"priming {vm.language} VM {vm.vm_id} failed (exit {result.exit_code}): "
                        f"{result.stderr[-300:]}",
                        context={"vm_id": vm.vm_id},
                    )
        except BaseException:
            await vm.close()
            raise

    async def _sleep_or_wakeup(self, seconds: float | None) -> None:
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()

    async def _yield_to_waiters(self) -> None:
        """Idle VMs hold capacity: when foreground callers queue for it, close idle VMs for them."""
        if self._admission is None or self._admission.stats().waiting == 0:
            return
        candidates = [slot for slot in self._slots.values() if slot.idle]
        if not candidates:
            return
        slot = max(candidates, key=lambda s: len(s.idle))
        pooled = slot.idle.pop()  # the newest: the oldest ones are next in line for checkout
        self.stats.yielded += 1
        logger.info("warm pool gives VM %s back to a queued foreground request", pooled.vm.vm_id)
        await self._dispose(pooled)

    # ------------------------------------------------------------------ health

    async def check_health(self) -> int:
        """Ping every idle VM now; close the dead ones (refill follows). Returns how many were dropped."""
        dropped = 0
        for slot in self._slots.values():
            for pooled in list(slot.idle):
                if await self._healthy(pooled.vm, on_checkout=False):
                    continue
                try:
                    slot.idle.remove(pooled)
                except ValueError:
                    continue  # checked out meanwhile: checkout runs its own check
                dropped += 1
                self.stats.unhealthy_dropped += 1
                await self._dispose(pooled)
        if dropped:
            self._wakeup.set()
        return dropped

    async def _health_loop(self) -> None:
        while self._state is WarmPoolState.RUNNING:  # see _refill_loop
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:
                logger.warning("warm pool health check failed", exc_info=True)
