"""The host's real capacity: memory, CPUs and the cgroup limits this process runs under.

Pure parsers + small readers that take their file roots as parameters::

    read_meminfo(proc_root)            MemTotal / MemAvailable from <proc>/meminfo
    read_cgroup_limits(proc_root)      memory and CPU limits of this process's cgroups, v2 and v1,
                                       found via <proc>/self/mountinfo and <proc>/self/cgroup; the
                                       effective limit is the smallest along the path to the root
    probe_host_resources(proc_root)    all of the above + os.sched_getaffinity -> HostResources
    MemoryHeadroomProbe(proc_root)     live: bytes that can still be taken *now* without swapping or
                                       an OOM kill = min(MemAvailable, every memory-limited cgroup
                                       level's limit - its working set); read on every call (admission
                                       control's live guard, see :mod:`exec_sandbox.sandbox.admission`)

Per-VM cgroups (writing) are :mod:`exec_sandbox.host.cgroups`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from exec_sandbox.errors import SandboxPermanentError

__all__ = [
    "CgroupLimits",
    "CgroupMemoryLevel",
    "CgroupMount",
    "HostResources",
    "MemInfo",
    "MemoryHeadroomProbe",
    "cpu_count",
    "find_cgroup2_mount",
    "find_memory_limited_cgroups",
    "parse_cpu_max",
    "parse_meminfo",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "probe_host_resources",
    "read_cgroup_limits",
    "read_cgroup_memory_headroom",
    "read_meminfo",
]

log = logging.getLogger(__name__)

PROC: Final = Path("/proc")
CPU_PERIOD_US: Final = 100_000
# cgroup v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page size).
_V1_UNLIMITED: Final = 1 << 62
_V1_NON_CONTROLLER_OPTS: Final = frozenset(
    {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode"}
)


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


def read_or_none(path: Path) -> str | None:
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
                mem = read_or_none(level / "memory.max")
                if mem is not None and mem != "max":
                    memory.append(int(mem))
                    sources.append(str(level / "memory.max"))
                cpu = read_or_none(level / "cpu.max")
                quota = parse_cpu_max(cpu) if cpu else None
                if quota is not None:
                    cpus.append(quota)
                    sources.append(str(level / "cpu.max"))
        else:
            if "memory" in mount.controllers and "memory" in membership:
                for level in _levels(mount, membership["memory"]):
                    mem = read_or_none(level / "memory.limit_in_bytes")
                    if mem is not None and mem.lstrip("-").isdigit() and 0 <= int(mem) < _V1_UNLIMITED:
                        memory.append(int(mem))
                        sources.append(str(level / "memory.limit_in_bytes"))
            if "cpu" in mount.controllers and "cpu" in membership:
                for level in _levels(mount, membership["cpu"]):
                    quota_us, period_us = (
                        read_or_none(level / "cpu.cfs_quota_us"),
                        read_or_none(level / "cpu.cfs_period_us"),
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
    text = read_or_none(level / "memory.max")
    return int(text) if text is not None and text.isdigit() else None


def _v1_limit(level: Path) -> int | None:
    text = read_or_none(level / "memory.limit_in_bytes")
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
        limit, usage = _v2_limit(level.path), read_or_none(level.path / "memory.current")
        inactive = _stat_value(read_or_none(level.path / "memory.stat"), "inactive_file")
    else:
        limit, usage = _v1_limit(level.path), read_or_none(level.path / "memory.usage_in_bytes")
        stat = read_or_none(level.path / "memory.stat")
        inactive = _stat_value(stat, "total_inactive_file", "inactive_file")
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
