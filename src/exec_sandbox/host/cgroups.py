"""Per-VM cgroup v2 groups, where the host delegates them.

:class:`CgroupManager` owns one parent cgroup (default ``<cgroup2 mount>/exec-sandbox``), enables
the controllers it can in the ancestors' ``cgroup.subtree_control``, and creates one child cgroup
per VM (:class:`VmCgroup`) with ``memory.max`` / ``pids.max`` / ``cpu.max``. A VM's cgroup is
removed on release: its processes are killed (``cgroup.kill``), then ``rmdir`` is retried until
the kernel has let go of them. :func:`probe_cgroup_delegation` says whether any of this works here.

Controllers a host does not offer in cgroup v2 (e.g. a hybrid v1/v2 host where memory/cpu/pids are
bound to v1) are reported in :attr:`CgroupSupport.missing_controllers` and skipped limits are listed
on the :class:`VmCgroup`; the Scheduler decides whether that is acceptable. Reading the host's
limits is :mod:`exec_sandbox.host.capacity`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from exec_sandbox.errors import SandboxInputError, SandboxPermanentError
from exec_sandbox.host.capacity import CPU_PERIOD_US, PROC, find_cgroup2_mount, read_or_none

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CGROUP_PARENT_NAME",
    "DEFAULT_CONTROLLERS",
    "CgroupManager",
    "CgroupManagerState",
    "CgroupSupport",
    "VmCgroup",
    "probe_cgroup_delegation",
]


DEFAULT_CGROUP_PARENT_NAME: Final = "exec-sandbox"


DEFAULT_CONTROLLERS: Final = ("memory", "pids", "cpu")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class CgroupSupport:
    """What :class:`CgroupManager` can do on this host."""

    usable: bool  # child cgroups can be created and processes moved into them
    parent: Path | None
    controllers: frozenset[str]  # controllers available to the VM cgroups
    missing_controllers: frozenset[str]  # wanted but not available in cgroup v2 here
    reason: str | None = None  # why not usable, or why controllers are missing

    @property
    def can_limit_memory(self) -> bool:
        return self.usable and "memory" in self.controllers

    @property
    def can_limit_pids(self) -> bool:
        return self.usable and "pids" in self.controllers

    @property
    def can_limit_cpu(self) -> bool:
        return self.usable and "cpu" in self.controllers


class CgroupManagerState(StrEnum):
    NEW = "new"
    OPEN = "open"
    UNUSABLE = "unusable"
    CLOSED = "closed"


def _write(path: Path, value: str) -> None:
    # One write() per value: cgroupfs parses each write as a whole.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _controllers(directory: Path) -> frozenset[str]:
    text = read_or_none(directory / "cgroup.controllers")
    return frozenset(text.split()) if text else frozenset()


class VmCgroup:
    """One VM's cgroup. Create with :meth:`CgroupManager.create`; remove with :meth:`release`."""

    def __init__(self, path: Path, *, applied: dict[str, str], skipped: tuple[str, ...]) -> None:
        self.path = path
        self.name = path.name
        self.applied = dict(applied)  # limit file -> value written
        self.skipped = skipped  # limit files not written: their controller is not available here
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (and later its children) into this cgroup."""
        if self._released:
            raise SandboxPermanentError(
                f"cgroup {self.path} is already released", context={"path": str(self.path)}
            )
        try:
            _write(self.path / "cgroup.procs", str(pid))
        except OSError as exc:
            raise SandboxPermanentError(
                f"cannot move pid {pid} into {self.path}: {exc.strerror}",
                context={"path": str(self.path), "pid": pid, "errno": exc.errno},
            ) from exc

    def pids(self) -> list[int]:
        text = read_or_none(self.path / "cgroup.procs")
        return [int(p) for p in text.split()] if text else []

    def memory_peak_bytes(self) -> int | None:
        """Peak memory of the cgroup (``memory.peak``, Linux >= 5.19), or None where unavailable."""
        text = read_or_none(self.path / "memory.peak")
        return int(text) if text and text.isdigit() else None

    def oom_kills(self) -> int | None:
        """How many processes the kernel OOM-killed in this cgroup, or None without memory control."""
        text = read_or_none(self.path / "memory.events")
        if text is None:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (``cgroup.kill``; per pid on kernels before 5.14)."""
        if (self.path / "cgroup.kill").exists():
            with contextlib.suppress(FileNotFoundError):
                _write(self.path / "cgroup.kill", "1")
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def release(self, *, kill: bool = True, timeout: float = 5.0) -> bool:
        """Remove the cgroup (idempotent). Kills what is left in it unless ``kill=False``.

        ``rmdir`` fails with EBUSY until the kernel has reaped every member, so it is retried until
        ``timeout``. Returns False (and logs) if the cgroup could not be removed in time.
        """
        if self._released:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while True:
            if kill:
                self.kill()
            try:
                self.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", self.path, exc)
                    return False
                if loop.time() >= deadline:
                    log.warning(
                        "cgroup %s still has processes %s after %.1fs", self.path, self.pids(), timeout
                    )
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            self._released = True
            return True

    def __repr__(self) -> str:
        return f"VmCgroup({str(self.path)!r}, applied={self.applied}, skipped={self.skipped})"


class CgroupManager:
    """Per-VM cgroup v2 limits under one parent cgroup.

    ::

        async with CgroupManager() as cgroups:        # open(): parent + controllers
            if cgroups.support.usable:
                vm = cgroups.create("vm-1234", memory_max_bytes=..., pids_max=..., cpu_max=1.0)
                vm.add_pid(qemu_pid)
                ...
                await vm.release()                     # kill leftovers, rmdir
        # aclose(): releases what is left, removes the parent if this manager created it

    Controllers enabled in pre-existing ancestors' ``cgroup.subtree_control`` stay enabled on close:
    other cgroups (or a concurrent manager) may rely on them by then, and disabling them is racy.
    """

    def __init__(
        self,
        parent: Path | None = None,
        *,
        proc_root: Path = PROC,
        controllers: Iterable[str] = DEFAULT_CONTROLLERS,
    ) -> None:
        self._parent_arg = parent
        self._proc_root = proc_root
        self._wanted = frozenset(controllers)
        self._state = CgroupManagerState.NEW
        self._created_parent = False
        self._children: dict[str, VmCgroup] = {}
        self.support = CgroupSupport(False, parent, frozenset(), self._wanted, "not opened")

    @property
    def state(self) -> CgroupManagerState:
        return self._state

    @property
    def parent(self) -> Path | None:
        return self.support.parent

    def open(self) -> CgroupSupport:
        """Create the parent cgroup and enable the wanted controllers (idempotent). Never raises for
        an unusable host: the answer is in the returned :class:`CgroupSupport` (also ``.support``)."""
        if self._state is not CgroupManagerState.NEW:
            return self.support
        self.support = self._open()
        self._state = CgroupManagerState.OPEN if self.support.usable else CgroupManagerState.UNUSABLE
        if not self.support.usable:
            log.info("per-VM cgroup limits unavailable: %s", self.support.reason)
        elif self.support.missing_controllers:
            log.info(
                "per-VM cgroups without %s: %s",
                ", ".join(sorted(self.support.missing_controllers)),
                self.support.reason,
            )
        return self.support

    def _unusable(self, parent: Path | None, reason: str) -> CgroupSupport:
        return CgroupSupport(False, parent, frozenset(), self._wanted, reason)

    def _open(self) -> CgroupSupport:
        mount = find_cgroup2_mount(self._proc_root)
        if mount is None:
            return self._unusable(self._parent_arg, "no cgroup v2 hierarchy is mounted")
        parent = self._parent_arg or mount / DEFAULT_CGROUP_PARENT_NAME
        try:
            rel = parent.relative_to(mount)
        except ValueError:
            return self._unusable(parent, f"{parent} is not inside the cgroup v2 mount {mount}")
        if not rel.parts:
            return self._unusable(parent, "the parent must be below the cgroup v2 root, not the root itself")
        chain = [mount.joinpath(*rel.parts[:n]) for n in range(len(rel.parts))]  # ancestors, root first
        if not chain[-1].is_dir():
            return self._unusable(parent, f"{chain[-1]} does not exist")
        try:
            parent.mkdir()
            self._created_parent = True
        except FileExistsError:
            pass
        except OSError as exc:
            return self._unusable(parent, f"cannot create {parent}: {exc.strerror}")
        reasons: list[str] = []
        for directory in [*chain, parent]:
            offered = _controllers(directory) & self._wanted
            enabled = frozenset((read_or_none(directory / "cgroup.subtree_control") or "").split())
            for ctrl in sorted(offered - enabled):
                try:
                    _write(directory / "cgroup.subtree_control", f"+{ctrl}")
                except OSError as exc:
                    # EBUSY: the "no internal processes" rule (the directory has member processes).
                    reasons.append(f"cannot enable {ctrl} in {directory}: {exc.strerror}")
        available = _controllers(parent) & self._wanted
        enabled_in_parent = frozenset((read_or_none(parent / "cgroup.subtree_control") or "").split())
        available &= enabled_in_parent
        missing = self._wanted - available
        if missing and not reasons:
            reasons.append(
                f"{', '.join(sorted(missing))} not offered by cgroup v2 here "
                "(bound to cgroup v1 on a hybrid host, or not delegated)"
            )
        if not os.access(parent, os.W_OK):
            self._rmdir_parent()
            return self._unusable(parent, f"{parent} is not writable")
        return CgroupSupport(True, parent, available, missing, "; ".join(reasons) or None)

    def _check_open(self) -> Path:
        if self._state is CgroupManagerState.NEW:
            self.open()
        if self._state is not CgroupManagerState.OPEN or self.support.parent is None:
            raise SandboxPermanentError(
                f"per-VM cgroups are not available (state {self._state.value}): {self.support.reason}",
                context={"state": self._state.value, "reason": self.support.reason},
            )
        return self.support.parent

    def create(
        self,
        name: str,
        *,
        memory_max_bytes: int | None = None,
        memory_swap_max_bytes: int | None = None,
        pids_max: int | None = None,
        cpu_max: float | None = None,
    ) -> VmCgroup:
        """Create child cgroup ``name`` and write the given limits.

        Limits whose controller is unavailable are skipped and listed in ``VmCgroup.skipped``. If a
        write fails the cgroup is removed again before the error is raised.
        """
        parent = self._check_open()
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SandboxInputError(
                "cgroup name must be 1-128 of [A-Za-z0-9_.-], starting with a letter or digit",
                context={"field": "name", "value": repr(name)[:200]},
            )
        wanted: list[tuple[str, str, str]] = []  # (controller, file, value)
        if memory_max_bytes is not None:
            wanted.append(("memory", "memory.max", str(_positive("memory_max_bytes", memory_max_bytes))))
        if memory_swap_max_bytes is not None:
            wanted.append(
                (
                    "memory",
                    "memory.swap.max",
                    str(_positive("memory_swap_max_bytes", memory_swap_max_bytes, allow_zero=True)),
                )
            )
        if pids_max is not None:
            wanted.append(("pids", "pids.max", str(_positive("pids_max", pids_max))))
        if cpu_max is not None:
            if isinstance(cpu_max, bool) or not isinstance(cpu_max, (int, float)) or not cpu_max > 0:
                raise SandboxInputError(
                    "cpu_max must be a positive number of CPUs",
                    context={"field": "cpu_max", "value": repr(cpu_max)},
                )
            quota = max(1000, round(cpu_max * CPU_PERIOD_US))
            wanted.append(("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
        path = parent / name
        try:
            path.mkdir()
        except FileExistsError:
            raise SandboxPermanentError(
                f"cgroup {path} already exists", context={"path": str(path)}
            ) from None
        except OSError as exc:
            raise SandboxPermanentError(
                f"cannot create cgroup {path}: {exc.strerror}",
                context={"path": str(path), "errno": exc.errno},
            ) from exc
        applied: dict[str, str] = {}
        skipped: list[str] = []
        try:
            for ctrl, filename, value in wanted:
                target = path / filename
                if ctrl not in self.support.controllers or not target.exists():
                    skipped.append(filename)
                    continue
                try:
                    _write(target, value)
                except OSError as exc:
                    raise SandboxPermanentError(
                        f"cannot write {value!r} to {target}: {exc.strerror}",
                        context={"path": str(target), "value": value, "errno": exc.errno},
                    ) from exc
                applied[filename] = value
        except BaseException:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise
        cgroup = VmCgroup(path, applied=applied, skipped=tuple(skipped))
        self._children[name] = cgroup
        return cgroup

    def _rmdir_parent(self) -> None:
        if self._created_parent and self.support.parent is not None:
            try:
                self.support.parent.rmdir()
            except OSError as exc:
                # Another manager sharing the parent may still have VM cgroups in it.
                log.debug("leaving cgroup parent %s: %s", self.support.parent, exc)
            self._created_parent = False

    async def aclose(self) -> None:
        """Release every VM cgroup this manager made and remove the parent it created (idempotent)."""
        if self._state is CgroupManagerState.CLOSED:
            return
        self._state = CgroupManagerState.CLOSED
        try:
            for cgroup in reversed(list(self._children.values())):
                await cgroup.release()
        finally:
            self._children.clear()
            self._rmdir_parent()

    async def __aenter__(self) -> CgroupManager:
        self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _positive(field_name: str, value: object, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise SandboxInputError(
            f"{field_name} must be a {'non-negative' if allow_zero else 'positive'} int",
            context={"field": field_name, "value": repr(value)[:200]},
        )
    return value


async def probe_cgroup_delegation(
    parent: Path | None = None, *, proc_root: Path = PROC, controllers: Iterable[str] = DEFAULT_CONTROLLERS
) -> CgroupSupport:
    """Can per-VM cgroups be made here, and which limits work? Leaves nothing behind.

    Opens a :class:`CgroupManager`, creates a probe child with a limit for every available
    controller, then removes both. A failing limit write demotes that controller to missing.
    """
    manager = CgroupManager(parent, proc_root=proc_root, controllers=controllers)
    try:
        support = manager.open()
        if not support.usable:
            return support
        probe = f"probe-{os.getpid()}-{id(manager):x}"
        try:
            await manager.create(probe).release()
        except SandboxPermanentError as exc:
            return CgroupSupport(False, support.parent, frozenset(), frozenset(controllers), exc.message)
        working = set(support.controllers)
        notes = [support.reason] if support.reason else []
        limits: dict[str, dict[str, Any]] = {
            "memory": {"memory_max_bytes": 64 << 20},
            "pids": {"pids_max": 64},
            "cpu": {"cpu_max": 1.0},
        }
        for ctrl, kwargs in limits.items():
            if ctrl not in working:
                continue
            try:
                child = manager.create(f"{probe}-{ctrl}", **kwargs)
            except SandboxPermanentError as exc:
                working.discard(ctrl)
                notes.append(exc.message)
                continue
            if child.skipped:
                working.discard(ctrl)
            await child.release()
        wanted = frozenset(controllers)
        return CgroupSupport(
            True, support.parent, frozenset(working), wanted - working, "; ".join(notes) or None
        )
    finally:
        await manager.aclose()
