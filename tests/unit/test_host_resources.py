"""Host capacity readers, fed with real files in fake /proc and cgroup trees under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.host.capacity import (
    CgroupLimits,
    CgroupMount,
    HostResources,
    cpu_count,
    find_cgroup2_mount,
    parse_cpu_max,
    parse_meminfo,
    parse_mountinfo,
    parse_proc_cgroup,
    probe_host_resources,
    read_cgroup_limits,
    read_meminfo,
)
from exec_sandbox.host.cgroups import CgroupManager, CgroupManagerState, probe_cgroup_delegation

GiB = 1024**3

MEMINFO = """\
MemTotal:       24731708 kB
MemFree:         1000000 kB
MemAvailable:   23997344 kB
Buffers:          123456 kB
HugePages_Total:       0
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mount_line(n: int, root: str, mount_point: Path, fstype: str, super_opts: str) -> str:
    return f"{n} 1 0:{n} {root} {mount_point} rw,relatime shared:{n} - {fstype} {fstype} {super_opts}\n"


class FakeHost:
    """A /proc and cgroup filesystem layout of real files under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.proc = tmp_path / "proc"
        self.sys = tmp_path / "sys" / "fs" / "cgroup"
        self.mounts: list[str] = ["22 1 0:21 / /proc rw - proc proc rw\n"]
        self.membership: list[str] = []
        write(self.proc / "meminfo", MEMINFO)

    def mount(self, root: str, sub: str, fstype: str, opts: str) -> Path:
        point = self.sys / sub if sub else self.sys
        point.mkdir(parents=True, exist_ok=True)
        self.mounts.append(mount_line(30 + len(self.mounts), root, point, fstype, opts))
        return point

    def member(self, line: str) -> None:
        self.membership.append(line + "\n")

    def commit(self) -> None:
        write(self.proc / "self" / "mountinfo", "".join(self.mounts))
        write(self.proc / "self" / "cgroup", "".join(self.membership))


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


# --------------------------------------------------------------------------- meminfo / CPUs


def test_parse_meminfo() -> None:
    info = parse_meminfo(MEMINFO)
    assert info.total_bytes == 24731708 * 1024
    assert info.available_bytes == 23997344 * 1024


def test_parse_meminfo_without_memavailable_uses_memfree() -> None:
    info = parse_meminfo("MemTotal: 2048 kB\nMemFree: 1024 kB\n")
    assert (info.total_bytes, info.available_bytes) == (2 * 1024 * 1024, 1024 * 1024)


def test_parse_meminfo_without_total_is_an_error() -> None:
    with pytest.raises(SandboxPermanentError, match="MemTotal"):
        parse_meminfo("MemFree: 1 kB\n")


def test_read_meminfo_from_a_tree(host: FakeHost) -> None:
    assert read_meminfo(host.proc).total_bytes == 24731708 * 1024


def test_read_meminfo_of_this_host() -> None:
    info = read_meminfo()
    assert 0 < info.available_bytes <= info.total_bytes


def test_cpu_count_is_the_affinity() -> None:
    assert cpu_count() == len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- parsers


def test_parse_mountinfo() -> None:
    text = (
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 /process_api/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/my\\040unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
        "garbage line\n"
    )
    assert parse_mountinfo(text) == [
        CgroupMount(1, Path("/sys/fs/cgroup/cpu,cpuacct"), "/", frozenset({"cpu", "cpuacct"})),
        CgroupMount(1, Path("/sys/fs/cgroup/memory"), "/process_api/abc", frozenset({"memory"})),
        CgroupMount(1, Path("/sys/fs/cgroup/systemd"), "/", frozenset()),
        CgroupMount(2, Path("/sys/fs/cgroup/my unified"), "/", frozenset()),
    ]


def test_parse_proc_cgroup() -> None:
    text = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/user.slice/a\n"
    assert parse_proc_cgroup(text) == {
        "name=systemd": "/",
        "memory": "/process_api/abc",
        "cpu": "/x",
        "cpuacct": "/x",
        "": "/user.slice/a",
    }


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000", None),
        ("max", None),
        ("", None),
        ("150000 100000", 1.5),
        ("50000 100000", 0.5),
        ("200000", 2.0),
        ("10000 5000", 2.0),
    ],
)
def test_parse_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


# --------------------------------------------------------------------------- cgroup limits


def test_cgroup_v2_limits_are_the_smallest_along_the_path(host: FakeHost) -> None:
    mount = host.mount("/", "", "cgroup2", "rw")
    host.member("0::/system.slice/app.service")
    host.commit()
    write(mount / "cgroup.controllers", "cpu memory pids")  # the root has no memory.max / cpu.max
    write(mount / "system.slice" / "memory.max", str(4 * GiB))
    write(mount / "system.slice" / "cpu.max", "max 100000")
    write(mount / "system.slice" / "app.service" / "memory.max", "max")
    write(mount / "system.slice" / "app.service" / "cpu.max", "150000 100000")
    limits = read_cgroup_limits(host.proc)
    assert limits.memory_max_bytes == 4 * GiB
    assert limits.cpu_max == 1.5
    assert limits.sources == (
        str(mount / "system.slice" / "app.service" / "cpu.max"),
        str(mount / "system.slice" / "memory.max"),
    )


def test_cgroup_v2_leaf_limit_smaller_than_parent(host: FakeHost) -> None:
    mount = host.mount("/", "", "cgroup2", "rw")
    host.member("0::/a/b")
    host.commit()
    write(mount / "a" / "memory.max", str(8 * GiB))
    write(mount / "a" / "b" / "memory.max", str(1 * GiB))
    assert read_cgroup_limits(host.proc).memory_max_bytes == 1 * GiB


def test_cgroup_v1_hybrid_limits(host: FakeHost) -> None:
    memory = host.mount("/", "memory", "cgroup", "rw,memory")
    cpu = host.mount("/", "cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")
    unified = host.mount("/", "unified", "cgroup2", "rw")
    host.member("4:memory:/process_api/abc")
    host.member("2:cpu,cpuacct:/")
    host.member("0::/")
    host.commit()
    write(unified / "cgroup.controllers", "hugetlb")
    write(memory / "memory.limit_in_bytes", "9223372036854771712")  # v1's "unlimited"
    write(memory / "process_api" / "memory.limit_in_bytes", str(2 * GiB))
    write(memory / "process_api" / "abc" / "memory.limit_in_bytes", "9223372036854771712")
    write(cpu / "cpu.cfs_quota_us", "50000")
    write(cpu / "cpu.cfs_period_us", "100000")
    limits = read_cgroup_limits(host.proc)
    assert limits == CgroupLimits(
        memory_max_bytes=2 * GiB,
        cpu_max=0.5,
        sources=(str(memory / "process_api" / "memory.limit_in_bytes"), str(cpu / "cpu.cfs_quota_us")),
    )


def test_cgroup_v1_unlimited_quota(host: FakeHost) -> None:
    cpu = host.mount("/", "cpu", "cgroup", "rw,cpu")
    host.member("1:cpu:/")
    host.commit()
    write(cpu / "cpu.cfs_quota_us", "-1")
    write(cpu / "cpu.cfs_period_us", "100000")
    assert read_cgroup_limits(host.proc) == CgroupLimits()


def test_cgroup_mounted_from_a_subtree(host: FakeHost) -> None:
    # In a container the cgroup fs may be mounted with root = the container's own cgroup.
    memory = host.mount("/process_api/abc", "memory", "cgroup", "rw,memory")
    host.member("4:memory:/process_api/abc")
    host.commit()
    write(memory / "memory.limit_in_bytes", str(3 * GiB))
    assert read_cgroup_limits(host.proc).memory_max_bytes == 3 * GiB


def test_no_cgroup_files_means_no_limits(host: FakeHost) -> None:
    host.mount("/", "", "cgroup2", "rw")
    host.member("0::/gone/away")
    host.commit()
    assert read_cgroup_limits(host.proc) == CgroupLimits()


def test_missing_proc_files_mean_no_limits(tmp_path: Path) -> None:
    assert read_cgroup_limits(tmp_path) == CgroupLimits()


def test_host_resources_effective_limits() -> None:
    res = HostResources(8 * GiB, 6 * GiB, 4, CgroupLimits(memory_max_bytes=2 * GiB, cpu_max=1.5))
    assert (res.memory_limit_bytes, res.cpu_limit) == (2 * GiB, 1.5)
    res = HostResources(8 * GiB, 6 * GiB, 2, CgroupLimits(memory_max_bytes=64 * GiB, cpu_max=8.0))
    assert (res.memory_limit_bytes, res.cpu_limit) == (8 * GiB, 2.0)
    res = HostResources(8 * GiB, 6 * GiB, 2)
    assert (res.memory_limit_bytes, res.cpu_limit) == (8 * GiB, 2.0)


def test_probe_host_resources_from_a_tree(host: FakeHost) -> None:
    mount = host.mount("/", "", "cgroup2", "rw")
    host.member("0::/box")
    host.commit()
    write(mount / "box" / "memory.max", str(1 * GiB))
    res = probe_host_resources(host.proc)
    assert res.memory_total_bytes == 24731708 * 1024
    assert res.memory_limit_bytes == 1 * GiB
    assert res.cpu_count == len(os.sched_getaffinity(0))


def test_probe_host_resources_of_this_host() -> None:
    res = probe_host_resources()
    assert 0 < res.memory_limit_bytes <= res.memory_total_bytes
    assert 0 < res.cpu_limit <= res.cpu_count


# --------------------------------------------------------------------------- cgroup v2 discovery / manager


def test_find_cgroup2_mount(host: FakeHost) -> None:
    host.mount("/", "memory", "cgroup", "rw,memory")
    unified = host.mount("/", "unified", "cgroup2", "rw")
    host.commit()
    assert find_cgroup2_mount(host.proc) == unified


def test_find_cgroup2_mount_none(host: FakeHost, tmp_path: Path) -> None:
    host.mount("/", "memory", "cgroup", "rw,memory")
    host.commit()
    assert find_cgroup2_mount(host.proc) is None
    assert find_cgroup2_mount(tmp_path / "nothing") is None


async def test_manager_without_cgroup2_is_unusable(host: FakeHost) -> None:
    host.mount("/", "memory", "cgroup", "rw,memory")
    host.commit()
    async with CgroupManager(proc_root=host.proc) as manager:
        support = manager.support
        assert not support.usable and not support.can_limit_memory
        assert support.reason == "no cgroup v2 hierarchy is mounted"
        assert support.missing_controllers == {"memory", "pids", "cpu"}
        assert manager.state is CgroupManagerState.UNUSABLE
        with pytest.raises(SandboxPermanentError) as info:
            manager.create("vm-1")
        assert info.value.context["state"] == "unusable"
    assert manager.state == CgroupManagerState.CLOSED  # type: ignore[comparison-overlap]
    await manager.aclose()  # idempotent


async def test_manager_parent_must_be_inside_the_mount(host: FakeHost, tmp_path: Path) -> None:
    mount = host.mount("/", "", "cgroup2", "rw")
    host.commit()
    outside = CgroupManager(tmp_path / "elsewhere", proc_root=host.proc)
    assert "not inside" in (outside.open().reason or "")
    root = CgroupManager(mount, proc_root=host.proc)
    assert "below the cgroup v2 root" in (root.open().reason or "")
    deep = CgroupManager(mount / "missing" / "parent", proc_root=host.proc)
    assert "does not exist" in (deep.open().reason or "")
    for m in (outside, root, deep):
        await m.aclose()
    assert sorted(p.name for p in mount.iterdir()) == []  # nothing was created


async def test_probe_delegation_reports_unusable_host(host: FakeHost) -> None:
    host.commit()
    support = await probe_cgroup_delegation(proc_root=host.proc)
    assert not support.usable and support.reason
