"""The host's real capacity, and per-VM cgroup v2 limits where the host delegates them.

Reading (pure parsers + small readers that take their file roots as parameters)::

    read_meminfo(proc_root)            MemTotal / MemAvailable from <proc>/meminfo
    read_cgroup_limits(proc_root)      memory and CPU limits of this process's cgroups, v2 and v1,
                                       found via <proc>/self/mountinfo and <proc>/self/cgroup; the
                                       effective limit is the smallest along the path to the root
    probe_host_resources(proc_root)    all of the above + os.sched_getaffinity -> HostResources
    MemoryHeadroomProbe(proc_root)     live: bytes that can still be taken *now* without swapping or
                                       an OOM kill = min(MemAvailable, every memory-limited cgroup
                                       level's limit - its working set); read on every call (admission
                                       control's live guard, see :mod:`exec_sandbox.sandbox.admission`)

Writing: :class:`CgroupManager` owns one parent cgroup (default ``<cgroup2 mount>/exec-sandbox``),
enables the controllers it can in the ancestors' ``cgroup.subtree_control``, and creates one child
cgroup per VM (:class:`VmCgroup`) with ``memory.max`` / ``pids.max`` / ``cpu.max``. A VM's cgroup is
removed on release: its processes are killed (``cgroup.kill``), then ``rmdir`` is retried until
the kernel has let go of them. :func:`probe_cgroup_delegation` says whether any of this works here.

Controllers a host does not offer in cgroup v2 (e.g. a hybrid v1/v2 host where memory/cpu/pids are
bound to v1) are reported in :attr:`CgroupSupport.missing_controllers` and skipped limits are listed
on the :class:`VmCgroup`; the Scheduler decides whether that is acceptable.
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
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from exec_sandbox.errors import SandboxInputError, SandboxPermanentError

__all__ = [
    "DEFAULT_CGROUP_PARENT_NAME",
    "DEFAULT_CONTROLLERS",
    "CgroupLimits",
    "CgroupManager",
    "CgroupManagerState",
    "CgroupMemoryLevel",
    "CgroupMount",
    "CgroupSupport",
    "HostResources",
    "MemInfo",
    "MemoryHeadroomProbe",
    "VmCgroup",
    "cpu_count",
    "find_cgroup2_mount",
    "find_memory_limited_cgroups",
    "parse_cpu_max",
    "parse_meminfo",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "probe_cgroup_delegation",
    "probe_host_resources",
    "read_cgroup_limits",
    "read_cgroup_memory_headroom",
    "read_meminfo",
]

log = logging.getLogger(__name__)

PROC: Final = Path("/proc")
DEFAULT_CGROUP_PARENT_NAME: Final = "exec-sandbox"
DEFAULT_CONTROLLERS: Final = ("memory", "pids", "cpu")
CPU_PERIOD_US: Final = 100_000
# cgroup v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page size).
_V1_UNLIMITED: Final = 1 << 62
_V1_NON_CONTROLLER_OPTS: Final = frozenset(
    {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode"}
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class MemInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem from mountinfo: where it is mounted and which cgroup is its root."""

    version: Literal[1, 2]
    mount_point: Path
    root: str
    controllers: frozenset[str]  # v1: the bound controllers; v2: empty (see cgroup.controllers)


@dataclass(frozen=True)
class CgroupLimits:
    """Limits imposed on this process by its cgroups; ``None`` = no limit found."""

    memory_max_bytes: int | None = None
    cpu_max: float | None = None  # in CPUs (quota / period)
    sources: tuple[str, ...] = ()  # the files the limits came from, for logs


@dataclass(frozen=True)
class HostResources:
    memory_total_bytes: int
    memory_available_bytes: int
    cpu_count: int  # CPUs this process may run on (affinity)
    cgroup: CgroupLimits = field(default_factory=CgroupLimits)

    @property
    def memory_limit_bytes(self) -> int:
        """Memory this process can use at most: RAM, or its cgroup limit when that is smaller."""
        limit = self.cgroup.memory_max_bytes
        return self.memory_total_bytes if limit is None else min(self.memory_total_bytes, limit)

    @property
    def cpu_limit(self) -> float:
        """CPUs this process can use at most: its affinity, or its cgroup quota when that is smaller."""
        quota = self.cgroup.cpu_max
        return float(self.cpu_count) if quota is None else min(float(self.cpu_count), quota)


def parse_meminfo(text: str) -> MemInfo:
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            values[key.strip()] = int(parts[0]) * scale
    if "MemTotal" not in values:
        raise SandboxPermanentError("meminfo has no MemTotal line", context={"text": text[:200]})
    # MemAvailable exists since Linux 3.14; older kernels get the conservative MemFree.
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return MemInfo(total_bytes=values["MemTotal"], available_bytes=available)


def read_meminfo(proc_root: Path = PROC) -> MemInfo:
    return parse_meminfo((proc_root / "meminfo").read_text())


def _unescape_mount(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup (v1) and cgroup2 mounts listed in a ``/proc/<pid>/mountinfo`` text."""
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields_left, fields_right = left.split(), right.split()
        if len(fields_left) < 5 or len(fields_right) < 3:
            continue
        fstype, super_opts = fields_right[0], fields_right[2]
        root, mount_point = _unescape_mount(fields_left[3]), Path(_unescape_mount(fields_left[4]))
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, mount_point, root, frozenset()))
        elif fstype == "cgroup":
            ctrls = frozenset(
                o for o in super_opts.split(",") if o not in _V1_NON_CONTROLLER_OPTS and "=" not in o
            )
            mounts.append(CgroupMount(1, mount_point, root, ctrls))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller: path}; the cgroup v2 entry has the key ``""``."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:
            result[""] = path
        for ctrl in ctrls.split(","):
            if ctrl:
                result[ctrl] = path
    return result


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"max 100000"`` or ``"<quota> <period>"``) in CPUs; None = unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else CPU_PERIOD_US
    return int(parts[0]) / period


def _levels(mount: CgroupMount, cgroup_path: str) -> list[Path]:
    """Directories from the process's cgroup up to the mount's root, leaf first, that exist."""
    rel = cgroup_path
    if mount.root not in ("", "/") and (rel == mount.root or rel.startswith(mount.root.rstrip("/") + "/")):
        rel = rel[len(mount.root) :]
    parts = [p for p in rel.split("/") if p and p not in (".", "..")]
    dirs = [mount.mount_point.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def read_cgroup_limits(proc_root: Path = PROC, *, pid: int | Literal["self"] = "self") -> CgroupLimits:
    """Memory and CPU limits of ``pid``'s cgroups (v2 ``memory.max``/``cpu.max``, v1 equivalents)."""
    proc = proc_root / str(pid)
    try:
        mounts = parse_mountinfo((proc / "mountinfo").read_text())
        membership = parse_proc_cgroup((proc / "cgroup").read_text())
    except FileNotFoundError:
        return CgroupLimits()
    memory: list[int] = []
    cpus: list[float] = []
    sources: list[str] = []
    for mount in mounts:
        if mount.version == 2:
            path = membership.get("")
            if path is None:
                continue
            for level in _levels(mount, path):
                mem = _read(level / "memory.max")
                if mem is not None and mem != "max":
                    memory.append(int(mem))
                    sources.append(str(level / "memory.max"))
                cpu = _read(level / "cpu.max")
                quota = parse_cpu_max(cpu) if cpu else None
                if quota is not None:
                    cpus.append(quota)
                    sources.append(str(level / "cpu.max"))
        else:
            if "memory" in mount.controllers and "memory" in membership:
                for level in _levels(mount, membership["memory"]):
                    mem = _read(level / "memory.limit_in_bytes")
                    if mem is not None and mem.lstrip("-").isdigit() and 0 <= int(mem) < _V1_UNLIMITED:
                        memory.append(int(mem))
                        sources.append(str(level / "memory.limit_in_bytes"))
            if "cpu" in mount.controllers and "cpu" in membership:
                for level in _levels(mount, membership["cpu"]):
                    quota_us, period_us = (
                        _read(level / "cpu.cfs_quota_us"),
                        _read(level / "cpu.cfs_period_us"),
                    )
                    if quota_us and period_us and quota_us != "-1" and int(period_us) > 0:
                        cpus.append(int(quota_us) / int(period_us))
                        sources.append(str(level / "cpu.cfs_quota_us"))
    return CgroupLimits(
        memory_max_bytes=min(memory) if memory else None,
        cpu_max=min(cpus) if cpus else None,
        sources=tuple(sources),
    )


@dataclass(frozen=True)
class CgroupMemoryLevel:
    """One cgroup directory on this process's path that has a memory limit."""

    version: Literal[1, 2]
    path: Path


def find_memory_limited_cgroups(
    proc_root: Path = PROC, *, pid: int | Literal["self"] = "self"
) -> tuple[CgroupMemoryLevel, ...]:
    """The cgroup levels (v2 and v1) from ``pid``'s cgroup up to the root that limit memory."""
    proc = proc_root / str(pid)
    try:
        mounts = parse_mountinfo((proc / "mountinfo").read_text())
        membership = parse_proc_cgroup((proc / "cgroup").read_text())
    except FileNotFoundError:
        return ()
    found: list[CgroupMemoryLevel] = []
    for mount in mounts:
        if mount.version == 2:
            path = membership.get("")
            if path is None:
                continue
            found += [CgroupMemoryLevel(2, d) for d in _levels(mount, path) if _v2_limit(d) is not None]
        elif "memory" in mount.controllers and "memory" in membership:
            found += [
                CgroupMemoryLevel(1, d)
                for d in _levels(mount, membership["memory"])
                if _v1_limit(d) is not None
            ]
    return tuple(found)


def _v2_limit(level: Path) -> int | None:
    text = _read(level / "memory.max")
    return int(text) if text is not None and text.isdigit() else None


def _v1_limit(level: Path) -> int | None:
    text = _read(level / "memory.limit_in_bytes")
    if text is None or not text.isdigit() or int(text) >= _V1_UNLIMITED:
        return None
    return int(text)


def _stat_value(text: str | None, *keys: str) -> int:
    """The first of ``keys`` found in a ``memory.stat`` text (0 when none is)."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return next((values[k] for k in keys if k in values), 0)


def read_cgroup_memory_headroom(level: CgroupMemoryLevel) -> int | None:
    """``limit - working set`` of one cgroup level in bytes (None: no limit / unreadable now).

    The working set is usage minus inactive file cache (what the kernel reclaims first, before it
    would OOM-kill anything), the same measure container runtimes use for memory pressure.
    """
    if level.version == 2:
        limit, usage = _v2_limit(level.path), _read(level.path / "memory.current")
        inactive = _stat_value(_read(level.path / "memory.stat"), "inactive_file")
    else:
        limit, usage = _v1_limit(level.path), _read(level.path / "memory.usage_in_bytes")
        inactive = _stat_value(_read(level.path / "memory.stat"), "total_inactive_file", "inactive_file")
    if limit is None or usage is None or not usage.isdigit():
        return None
    return max(0, limit - max(0, int(usage) - inactive))


class MemoryHeadroomProbe:
    """Bytes that can still be taken now without swapping or an OOM kill; call it to read.

    ``min(MemAvailable, headroom of every memory-limited cgroup level)``. The cgroup levels are
    found once (at construction: this process does not move between cgroups); their usage, and
    ``<proc>/meminfo``, are read on every call (~20 us), so the answer is always current.
    """

    def __init__(self, proc_root: Path = PROC) -> None:
        self.proc_root = proc_root
        self.cgroup_levels = find_memory_limited_cgroups(proc_root)

    def __call__(self) -> int:
        available = read_meminfo(self.proc_root).available_bytes
        for level in self.cgroup_levels:
            headroom = read_cgroup_memory_headroom(level)
            if headroom is not None:
                available = min(available, headroom)
        return available

    def __repr__(self) -> str:
        levels = ", ".join(str(lv.path) for lv in self.cgroup_levels) or "none"
        return f"MemoryHeadroomProbe(proc_root={str(self.proc_root)!r}, cgroup_levels=[{levels}])"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def probe_host_resources(proc_root: Path = PROC) -> HostResources:
    """Host memory, CPUs and this process's cgroup limits."""
    meminfo = read_meminfo(proc_root)
    return HostResources(
        memory_total_bytes=meminfo.total_bytes,
        memory_available_bytes=meminfo.available_bytes,
        cpu_count=cpu_count(),
        cgroup=read_cgroup_limits(proc_root),
    )


def find_cgroup2_mount(proc_root: Path = PROC) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified`` on hybrid hosts)."""
    try:
        mounts = parse_mountinfo((proc_root / "self" / "mountinfo").read_text())
    except FileNotFoundError:
        return None
    for mount in mounts:
        if mount.version == 2 and mount.root == "/":
            return mount.mount_point
    return None


# --------------------------------------------------------------------------- writing (cgroup v2)


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
    text = _read(directory / "cgroup.controllers")
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
        text = _read(self.path / "cgroup.procs")
        return [int(p) for p in text.split()] if text else []

    def memory_peak_bytes(self) -> int | None:
        """Peak memory of the cgroup (``memory.peak``, Linux >= 5.19), or None where unavailable."""
        text = _read(self.path / "memory.peak")
        return int(text) if text and text.isdigit() else None

    def oom_kills(self) -> int | None:
        """How many processes the kernel OOM-killed in this cgroup, or None without memory control."""
        text = _read(self.path / "memory.events")
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
            enabled = frozenset((_read(directory / "cgroup.subtree_control") or "").split())
            for ctrl in sorted(offered - enabled):
                try:
                    _write(directory / "cgroup.subtree_control", f"+{ctrl}")
                except OSError as exc:
                    # EBUSY: the "no internal processes" rule (the directory has member processes).
                    reasons.append(f"cannot enable {ctrl} in {directory}: {exc.strerror}")
        available = _controllers(parent) & self._wanted
        enabled_in_parent = frozenset((_read(parent / "cgroup.subtree_control") or "").split())
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
