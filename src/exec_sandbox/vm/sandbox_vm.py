"""``SandboxVm``: one guest VM for code execution, booted through smartvm's :class:`QemuMachine`.

A sandbox VM is a QEMU ``-M microvm`` guest booted from a language bundle (kernel + qcow2 base
image), writing only to its own qcow2 overlay, with virtio-rng and one virtio-serial port
(:data:`AGENT_PORT_NAME`) on which the guest agent answers. This module never builds a QEMU
command line: it describes the machine with :class:`~smartvm.qemu.QemuMachineSpec` (the pure
:func:`build_machine_spec`) and lets :class:`~smartvm.qemu.QemuMachine` run it.

Lifecycle (a :class:`SandboxVmState` guards every call)::

    boot()/restore_from() --> READY <--pause()/resume()--> PAUSED
    READY/PAUSED --close()--> CLOSED          (idempotent; also on ``async with`` exit)
    QEMU exits by itself or the agent link breaks: calls fail; close() still cleans up

Host-side effects of a boot, undone in reverse on close or on ANY failure/cancellation of
``boot``/``restore_from``: the overlay file, the QEMU process (and its sockets, VM directory and
RAM file, which smartvm undoes), the agent connection. A failed boot raises
:class:`SandboxTransientError` (the code never ran; retry is safe) whose ``context`` holds the
phase, vm_id, console tail and QEMU stderr tail. ``CancelledError`` is re-raised untouched.
Caller bugs (:class:`SandboxInputError`) and host misconfiguration (:class:`SandboxPermanentError`,
e.g. an image build failure) pass through unchanged.

Snapshots (:meth:`SandboxVm.save_snapshot` / :meth:`SandboxVm.restore_from`): the directory format
is described in :mod:`exec_sandbox.vm.spec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from exec_sandbox.callbacks import TextCallback
from exec_sandbox.client.agent import AgentClient, ExecResult, OutputCallback
from exec_sandbox.errors import SandboxError, SandboxInputError, SandboxPermanentError, SandboxTransientError
from exec_sandbox.host.runtime_dirs import overlay_path, record_overlay, remove_overlay, unsafe_dir_error
from exec_sandbox.protocol.agent import DEFAULT_OUTPUT_CAP_BYTES, Hello, Language, ReseedResult
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.storage.qcow2 import create_overlay_with_qemu_img, get_image_info
from exec_sandbox.timing import elapsed_ms
from exec_sandbox.vm.boot_log import BootLogForwarder
from exec_sandbox.vm.spec import (
    AGENT_PORT_NAME,
    BootTiming,
    SandboxVmState,
    VmOptions,
    build_machine_spec,
    build_user_net,
    read_snapshot_dir,
    respec_for_restore,
    snapshot_meta,
)
from exec_sandbox.vm_manager import VmManager
from smartvm.cleanup import AsyncClosing, UndoStack, shielded
from smartvm.errors import SmartVMError
from smartvm.hostfs import UnsafePathError, atomic_write_file, private_copy
from smartvm.leftovers import private_runtime_dir
from smartvm.qemu import AccelChoice, QemuMachine, QemuMachineSpec, UserNetSpec
from smartvm.vmm.base import SnapshotFiles

__all__ = ["BootLogCallback", "SandboxVm"]

logger = logging.getLogger(__name__)

_CONSOLE_TAIL = 4000

BootLogCallback = TextCallback


def _absolute(path: Path | str) -> Path:
    return Path(path).absolute()


# How long a boot that lost its agent connection waits to see whether QEMU itself exited.
_EXIT_AFTER_RESET_S = 1.0


class SandboxVm(AsyncClosing):
    """One booted guest with a ready agent. Create with :meth:`boot` or :meth:`restore_from`."""

    def __init__(
        self,
        *,
        vm_id: str,
        options: VmOptions,
        machine: QemuMachine,
        overlay: Path,
        base_image: Path,
        runtime_dir: Path,
        qemu_img: str = "qemu-img",
    ) -> None:
        self.vm_id = vm_id
        self.options = options
        self.machine = machine
        self.overlay = overlay
        self.base_image = base_image
        self.runtime_dir = runtime_dir
        self.timing = BootTiming()
        self.hello: Hello | None = None
        # After a restore: which interpreters the snapshot brought along (and were reseeded).
        self.reseed_result: ReseedResult | None = None
        self._agent: AgentClient | None = None
        self._undo = UndoStack(f"sandbox VM {vm_id}", log=logger)
        self._state = SandboxVmState.BOOTING
        self._lock = asyncio.Lock()
        self._boot_log = BootLogForwarder(f"sbx-bootlog-{vm_id}")
        self._qemu_img = qemu_img
        self.net_env: dict[str, str] = {}  # proxy settings + secret placeholders (vm/network.py)

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> SandboxVmState:
        return self._state

    @property
    def language(self) -> Language:
        return self.options.language

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise SandboxTransientError(f"sandbox VM {self.vm_id} has no agent connection")
        return self._agent

    @property
    def accelerator(self) -> AccelChoice | None:
        """The accelerator QEMU runs with and why (``.accel`` is "kvm" or "tcg")."""
        return self.machine.accelerator

    @property
    def alive(self) -> bool:
        """True while the VM is READY/PAUSED, QEMU runs and the agent link is usable."""
        return (
            self._state in (SandboxVmState.READY, SandboxVmState.PAUSED)
            and self.machine.state.value in ("running", "paused")
            and self._agent is not None
            and self._agent.state.value == "ready"
        )

    def cpu_seconds(self) -> float | None:
        """CPU seconds the VM's QEMU process has used so far, measured on the host (None once it is
        gone). Whatever the guest says or hides, this is what it cost the host."""
        return self.machine.cpu_seconds()

    def console_output(self) -> str:
        """The tail of the guest console (kernel messages, init output)."""
        return self.machine.console_output()

    def __repr__(self) -> str:
        return f"SandboxVm(vm_id={self.vm_id!r}, language={self.language!r}, state={self._state.value!r})"

    def _require(self, *states: SandboxVmState, action: str) -> None:
        if self._state not in states:
            raise SandboxTransientError(
                f"cannot {action} sandbox VM {self.vm_id} in state {self._state.value!r}",
                context={"vm_id": self.vm_id, "state": self._state.value},
            )

    def _failure_context(self, phase: str) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "phase": phase,
            "language": self.language,
            "console_tail": self.machine.console_output()[-_CONSOLE_TAIL:],
            "qemu_stderr": self.machine.stderr_tail()[-_CONSOLE_TAIL:],
            "qemu_exit_code": self.machine.exit_code,
        }

    # ------------------------------------------------------------------ boot

    @classmethod
    async def boot(
        cls,
        options: VmOptions,
        *,
        settings: Settings | None = None,
        vm_manager: VmManager | None = None,
        overlay_pool: OverlayPool | None = None,
        runtime_dir: Path | None = None,
        on_boot_log: BootLogCallback | None = None,
        vm_id: str | None = None,
        nice: int = 0,
        user_net: UserNetSpec | None = None,
    ) -> SandboxVm:
        """Boot a fresh VM for ``options.language`` and wait for its agent (within ``boot_timeout_s``).

        The overlay comes from ``overlay_pool`` when given (else ``qemu-img create``). Images are
        built on first use by ``vm_manager`` (default: ``VmManager(settings)``); that build time is
        not part of ``boot_timeout_s``. ``on_boot_log`` gets each console line until the agent is up.
        ``nice``: QEMU's CPU priority (e.g. 10 for a VM made in the background; see :meth:`set_nice`).
        ``user_net``: the NIC, replacing :func:`build_user_net` (the egress wiring, :mod:`.network`).
        """
        started = time.perf_counter()
        settings = settings or (vm_manager.settings if vm_manager is not None else Settings())
        manager = vm_manager or VmManager(settings)
        t = time.perf_counter()
        bundle = await manager.aget_bundle(options.language, kernel_flavor=options.kernel_flavor)
        image_ms = elapsed_ms(t)

        def make_spec(overlay: Path, new_id: str) -> QemuMachineSpec:
            return build_machine_spec(
                kernel=bundle.kernel,
                initrd=bundle.initrd,
                boot_args=bundle.boot_args,
                needs_acpi=bundle.needs_acpi,
                overlay=overlay,
                options=options,
                name=f"sbx-{new_id}",
            )

        base = options.base_layer or bundle.rootfs
        vm = cls._new(options, settings, base, runtime_dir, vm_id, make_spec, nice=nice, user_net=user_net)
        vm.timing.image_ms = image_ms
        try:
            async with asyncio.timeout(options.boot_timeout_s):
                await vm._boot(overlay_pool, on_boot_log)
        except BaseException as exc:
            await vm._fail(exc, "boot", started_at=started)
            raise  # unreachable: _fail always raises
        vm.timing.total_ms = elapsed_ms(started)
        logger.info(
            "sandbox VM %s (%s) ready in %.0f ms (%s)",
            vm.vm_id,
            vm.language,
            vm.timing.total_ms,
            vm.accelerator.accel if vm.accelerator else "?",
        )
        return vm

    @classmethod
    def _new(
        cls,
        options: VmOptions,
        settings: Settings,
        base_image: Path,
        runtime_dir: Path | None,
        vm_id: str | None,
        make_spec: Callable[[Path, str], QemuMachineSpec],
        *,
        restoring: bool = False,
        nice: int = 0,
        user_net: UserNetSpec | None = None,
    ) -> SandboxVm:
        vm_id = vm_id or uuid.uuid4().hex[:12]
        try:
            rdir = (runtime_dir or private_runtime_dir()).absolute()
        except UnsafePathError as exc:
            raise unsafe_dir_error(exc) from exc
        overlay = overlay_path(rdir, vm_id)
        # A restore takes accelerator, user net and RAM mode from the snapshot's spec.
        accel = None if restoring else options.accel or ("tcg" if settings.force_emulation else None)
        machine = QemuMachine(
            make_spec(overlay, vm_id),
            vm_id=vm_id,
            binary=settings.qemu_system_binary,
            runtime_dir=rdir,
            accel=accel,
            serial_ports=(AGENT_PORT_NAME,),
            user_net=user_net or (None if restoring else build_user_net(options)),
            shared_memory=options.shared_memory and not restoring,
            nice=nice,
        )
        return cls(
            vm_id=vm_id,
            options=options,
            machine=machine,
            overlay=overlay,
            base_image=base_image,
            runtime_dir=rdir,
            qemu_img=settings.qemu_img_binary,
        )

    async def _make_overlay(self, overlay_pool: OverlayPool | None) -> None:
        # Registered before creating: a cancelled creation may leave a partial file behind.
        self._undo.push("remove overlay", self._remove_overlay)
        await asyncio.to_thread(record_overlay, self.runtime_dir, self.overlay, self.vm_id)
        t = time.perf_counter()
        size = self.options.disk_size_mb
        if size is not None:  # a sparse overlay of that virtual size (pooled ones have the base's)
            info = await get_image_info(self.base_image, qemu_img=self._qemu_img)
            await create_overlay_with_qemu_img(self.base_image, self.overlay, qemu_img=self._qemu_img,
                                               size=max(size << 20, info.virtual_size))
        elif overlay_pool is not None and self.options.base_layer is None:  # the pool serves base images
            self.timing.overlay_from_pool = await overlay_pool.acquire(self.base_image, self.overlay)
        else:
            await create_overlay_with_qemu_img(self.base_image, self.overlay, qemu_img=self._qemu_img)
        self.timing.overlay_ms = elapsed_ms(t)

    async def _remove_overlay(self) -> None:
        await asyncio.to_thread(remove_overlay, self.overlay)

    async def _boot(self, overlay_pool: OverlayPool | None, on_boot_log: BootLogCallback | None) -> None:
        await self._make_overlay(overlay_pool)
        if on_boot_log is not None:
            self._boot_log.start(self.machine.console.lines(), on_boot_log)
            self._undo.push("stop boot log", self._boot_log.aclose)
        await asyncio.sleep(0)  # let the log forwarder subscribe before QEMU prints anything
        t = time.perf_counter()
        self._undo.push("stop QEMU", self._stop_machine)
        await self.machine.start()
        self.timing.qemu_spawn_ms = elapsed_ms(t)
        t = time.perf_counter()
        await self._connect_agent()
        self.timing.boot_to_agent_ms = elapsed_ms(t)
        self._boot_log.stop()
        self._state = SandboxVmState.READY

    async def _connect_agent(self, *, reseed: bool = False) -> None:
        """Connect to the agent port and wait for hello, failing fast if QEMU exits meanwhile.

        ``reseed``: reseed the guest RNG in the same round trip (restores), before anything else.
        """
        socket_path = self.machine.serial_socket(AGENT_PORT_NAME)
        self._agent = await AgentClient.open_unix(
            socket_path, connect_timeout=10.0, name=f"agent-{self.vm_id}"
        )
        self._undo.push("close agent", self._close_agent)
        agent = self._agent
        timeout = self.options.boot_timeout_s

        async def hello_and_reseed() -> Hello:
            hello, self.reseed_result = await agent.ready_and_reseeded(timeout=timeout)
            return hello

        ready = asyncio.ensure_future(
            hello_and_reseed() if reseed else agent.wait_ready(timeout=self.options.boot_timeout_s)
        )
        exited = asyncio.ensure_future(self.machine.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and not ready.cancelled() and ready.exception() is not None:
                # QEMU exiting resets the agent's socket, and that reset can be read before QEMU's
                # exit is reaped: give the exit a moment, it is the better explanation.
                await asyncio.wait({exited}, timeout=_EXIT_AFTER_RESET_S)
        finally:
            for task in (ready, exited):
                if not task.done():
                    task.cancel()
            await asyncio.wait({ready, exited})
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            self.hello = ready.result()
            return
        if exited.done() and not exited.cancelled():
            raise SandboxTransientError(
                f"QEMU exited (code {exited.result()}) before the guest agent answered",
                context={"qemu_exit_code": exited.result()},
            )
        exc = ready.exception()
        assert exc is not None
        raise exc

    async def _close_agent(self) -> None:
        agent = self._agent
        if agent is not None:
            await agent.aclose()

    async def _stop_machine(self) -> None:
        await self.machine.stop(timeout=3.0)

    async def _fail(self, exc: BaseException, phase: str, *, started_at: float) -> None:
        """Undo everything, then raise the right error for ``exc`` (never returns)."""
        context = self._failure_context(phase)  # before cleanup closes the console
        context["elapsed_ms"] = round(elapsed_ms(started_at), 1)
        await shielded(self._undo.run())
        self._state = SandboxVmState.CLOSED
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            raise exc
        if isinstance(exc, SandboxInputError | SandboxPermanentError):
            raise exc
        if isinstance(exc, TimeoutError):
            message = f"sandbox VM {self.vm_id} was not ready within {self.options.boot_timeout_s:g}s"
        elif isinstance(exc, SandboxError):
            message = f"sandbox VM {self.vm_id} failed to {phase}: {exc.message}"
            context = {**exc.context, **context}
        elif isinstance(exc, SmartVMError):
            message = f"sandbox VM {self.vm_id} failed to {phase}: {exc.message}"
            context = {**context, "smartvm_code": exc.code, "smartvm_details": exc.details}
        else:
            message = f"sandbox VM {self.vm_id} failed to {phase}: {type(exc).__name__}: {exc}"
        raise SandboxTransientError(message, context=context) from exc

    # ------------------------------------------------------------------ use

    async def exec(
        self,
        code: str,
        *,
        language: Language | None = None,
        session: bool = False,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        cwd: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_stdout_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
        max_stderr_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
        reply_grace_s: float = 30.0,
        refill_spare: bool = True,
        prime_spare: bool = False,
    ) -> ExecResult:
        """Run ``code`` through the agent (default language: the VM's). See :meth:`AgentClient.exec`.

        The one door from the host into the guest for code: every exec (``Scheduler.run``,
        ``Session.exec`` through :func:`~exec_sandbox.vm.execution.execute_in_vm`, warm-pool priming)
        comes through here, so the VM's state is checked and its ``options.env`` merged under the
        call's ``env`` in one place (``tests/unit/test_layers.py`` checks nobody else calls
        ``agent.exec``). ``refill_spare=False`` for the last one-shot exec of a single-use VM: the
        guest then does not start a replacement spare interpreter it would never use.
        """
        self._require(SandboxVmState.READY, action="exec in")
        merged = {**self.options.env, **self.net_env, **(env or {})}
        return await self.agent.exec(
            code,
            language=language or self.language,
            env=merged,
            timeout_s=timeout_s,
            cwd=cwd,
            session=session,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_stdout_bytes=max_stdout_bytes,
            max_stderr_bytes=max_stderr_bytes,
            reply_grace_s=reply_grace_s,
            refill_spare=refill_spare,
            prime_spare=prime_spare,
        )

    async def pause(self) -> None:
        """Freeze the guest (QMP ``stop``). Agent calls wait until :meth:`resume`."""
        async with self._lock:
            if self._state is SandboxVmState.PAUSED:
                return
            self._require(SandboxVmState.READY, action="pause")
            await self._machine_call(self.machine.pause(), "pause")
            self._state = SandboxVmState.PAUSED

    async def resume(self) -> None:
        async with self._lock:
            if self._state is SandboxVmState.READY:
                return
            self._require(SandboxVmState.PAUSED, action="resume")
            await self._machine_call(self.machine.resume(), "resume")
            self._state = SandboxVmState.READY

    async def _machine_call(self, call: Awaitable[None], what: str) -> None:
        try:
            await call
        except SmartVMError as exc:
            raise SandboxTransientError(
                f"could not {what} sandbox VM {self.vm_id}: {exc.message}",
                context={"vm_id": self.vm_id, "smartvm_code": exc.code},
            ) from exc

    # ------------------------------------------------------------------ snapshots

    async def save_snapshot(self, directory: Path) -> Path:
        """Save memory + disk of this VM into ``directory`` (must not exist); the VM keeps running.

        The guest is paused for the duration (and stays paused if it was paused). Written into a
        temporary sibling and renamed, so ``directory`` either holds a complete snapshot or nothing.
        """
        directory = _absolute(directory)
        async with self._lock:
            self._require(SandboxVmState.READY, SandboxVmState.PAUSED, action="snapshot")
            if directory.exists():
                raise SandboxInputError(f"snapshot directory already exists: {directory}")
            was_running = self._state is SandboxVmState.READY
            tmp = directory.with_name(f".{directory.name}.tmp-{self.vm_id}")
            try:
                if was_running:
                    await self.machine.pause()
                await asyncio.to_thread(tmp.mkdir, 0o700, True)
                await self.machine.create_snapshot(
                    SnapshotFiles(snapshot_path=tmp / "vmstate", mem_file_path=tmp / "memory")
                )
                # QEMU flushed the overlay when the guest stopped and the migration inactivated it:
                # the file on disk now matches the saved memory.
                await asyncio.to_thread(private_copy, self.overlay, tmp / "disk.qcow2")
                accel = self.accelerator.accel if self.accelerator else None
                meta = snapshot_meta(self.vm_id, self.options, self.base_image, accel)
                await asyncio.to_thread(
                    atomic_write_file, tmp / "sandbox.json", json.dumps(meta, indent=1).encode()
                )
                await asyncio.to_thread(os.rename, tmp, directory)
            except BaseException as exc:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                if isinstance(exc, SmartVMError | OSError):
                    raise SandboxTransientError(
                        f"snapshot of sandbox VM {self.vm_id} failed: {exc}",
                        context={"vm_id": self.vm_id, "directory": str(directory)},
                    ) from exc
                raise
            finally:
                if was_running and self.machine.state.value == "paused":
                    with contextlib.suppress(SmartVMError):
                        await self.machine.resume()
            logger.info("sandbox VM %s snapshotted to %s", self.vm_id, directory)
            return directory

    @classmethod
    async def restore_from(
        cls,
        directory: Path,
        *,
        settings: Settings | None = None,
        runtime_dir: Path | None = None,
        vm_id: str | None = None,
        boot_timeout_s: float | None = None,
        reseed: bool = True,
        nice: int = 0,
        user_net: UserNetSpec | None = None,
    ) -> SandboxVm:
        """Start a new VM from a snapshot made by :meth:`save_snapshot`, in a fresh QEMU process.

        The disk is a private copy of the snapshot's overlay; the guest RNG is reseeded with host
        randomness (``reseed=False`` only for tests that want to see what happens without it).
        ``nice``, ``user_net``: as for :meth:`boot` (``user_net`` replaces the snapshot's NIC backend).
        """
        started = time.perf_counter()
        directory = _absolute(directory)
        settings = settings or Settings()
        options, base_image, saved_spec = read_snapshot_dir(directory)
        if boot_timeout_s is not None:
            options = options.model_copy(update={"boot_timeout_s": boot_timeout_s})

        def make_spec(overlay: Path, new_id: str) -> QemuMachineSpec:
            return respec_for_restore(saved_spec, overlay, new_id)

        vm = cls._new(options, settings, base_image, runtime_dir, vm_id, make_spec, restoring=True, nice=nice,
                      user_net=user_net)
        vm.timing.restored = True
        try:
            async with asyncio.timeout(options.boot_timeout_s):
                await vm._restore(directory, reseed=reseed)
        except BaseException as exc:
            await vm._fail(exc, "restore", started_at=started)
            raise
        vm.timing.total_ms = elapsed_ms(started)
        logger.info("sandbox VM %s restored from %s in %.0f ms", vm.vm_id, directory, vm.timing.total_ms)
        return vm

    def on_close(self, what: str, undo: Callable[[], Awaitable[None]]) -> None:
        """Run ``undo`` when this VM closes (in reverse order with its own steps; e.g. its gateway)."""
        self._undo.push(what, undo)

    def set_nice(self, nice: int) -> bool:
        """Set the CPU priority of this VM's QEMU (every thread). A VM made in the background at a
        high nice value is set back to 0 when it starts serving a caller; False if not allowed
        (raising priority needs CAP_SYS_NICE) or QEMU is gone."""
        return self.machine.set_nice(nice)

    async def _restore(self, directory: Path, *, reseed: bool) -> None:
        self._undo.push("remove overlay", self._remove_overlay)
        await asyncio.to_thread(record_overlay, self.runtime_dir, self.overlay, self.vm_id)
        t = time.perf_counter()
        await asyncio.to_thread(private_copy, directory / "disk.qcow2", self.overlay)
        self.timing.overlay_ms = elapsed_ms(t)
        t = time.perf_counter()
        self._undo.push("stop QEMU", self._stop_machine)
        await self.machine.load_snapshot(
            SnapshotFiles(snapshot_path=directory / "vmstate", mem_file_path=directory / "memory"),
            resume=True,
        )
        self.timing.qemu_spawn_ms = elapsed_ms(t)
        t = time.perf_counter()
        # The reseed rides in the same round trip as the first ping: nothing can run in the guest
        # before it, and the host does not wait for the hello before sending it.
        await self._connect_agent(reseed=reseed)
        hello_at = self.agent.first_hello_at or time.perf_counter()
        self.timing.boot_to_agent_ms = (hello_at - t) * 1000.0
        if reseed:
            self.timing.reseed_ms = elapsed_ms(hello_at)
        self._state = SandboxVmState.READY

    # ------------------------------------------------------------------ close

    async def aclose(self) -> None:
        """Stop QEMU, close the agent link, delete the overlay. Idempotent, safe in any state."""
        async with self._lock:
            if self._state in (SandboxVmState.CLOSED, SandboxVmState.CLOSING):
                return
            self._state = SandboxVmState.CLOSING
            try:
                await shielded(self._undo.run())
            finally:
                self._state = SandboxVmState.CLOSED

    close = aclose  # the older name, kept

