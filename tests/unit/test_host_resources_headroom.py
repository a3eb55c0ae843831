"""MemoryHeadroomProbe and the cgroup headroom readers, fed with real files under tmp_path."""

from __future__ import annotations

from pathlib import Path

from exec_sandbox.host.capacity import (
    CgroupMemoryLevel,
    MemoryHeadroomProbe,
    find_memory_limited_cgroups,
    read_cgroup_memory_headroom,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
V1_UNLIMITED = "9223372036854771712"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class Tree:
    """/proc (meminfo, self/mountinfo, self/cgroup) and cgroup mounts as real files."""

    def __init__(self, tmp_path: Path, available_gib: float = 20) -> None:
        self.proc = tmp_path / "proc"
        self.sys = tmp_path / "sys"
        self.mounts: list[str] = []
        self.members: list[str] = []
        self.meminfo(available_gib)

    def meminfo(self, available_gib: float) -> None:
        kib = int(available_gib * GiB) // 1024
        write(self.proc / "meminfo", f"MemTotal: {24 * GiB // 1024} kB\nMemAvailable: {kib} kB\n")

    def mount(self, sub: str, fstype: str, opts: str, root: str = "/") -> Path:
        point = self.sys / sub
        point.mkdir(parents=True, exist_ok=True)
        n = 30 + len(self.mounts)
        self.mounts.append(f"{n} 1 0:{n} {root} {point} rw,relatime - {fstype} {fstype} {opts}\n")
        return point

    def commit(self, *members: str) -> None:
        write(self.proc / "self" / "mountinfo", "".join(self.mounts))
        write(self.proc / "self" / "cgroup", "".join(m + "\n" for m in members))


def test_no_cgroup_limit_means_meminfo(tmp_path: Path) -> None:
    tree = Tree(tmp_path, available_gib=20)
    unified = tree.mount("unified", "cgroup2", "rw")
    tree.commit("0::/app")
    write(unified / "app" / "memory.max", "max")
    probe = MemoryHeadroomProbe(tree.proc)
    assert probe.cgroup_levels == ()
    assert probe() == 20 * GiB
    tree.meminfo(3)  # read again on every call
    assert probe() == 3 * GiB
    assert "cgroup_levels=[none]" in repr(probe)


def test_cgroup_v2_headroom_is_limit_minus_working_set(tmp_path: Path) -> None:
    tree = Tree(tmp_path, available_gib=20)
    unified = tree.mount("unified", "cgroup2", "rw")
    tree.commit("0::/box/app")
    write(unified / "box" / "memory.max", str(2 * GiB))
    write(unified / "box" / "memory.current", str(GiB + GiB // 2))
    write(unified / "box" / "memory.stat", f"anon 1000\nfile 5000\ninactive_file {GiB // 4}\n")
    write(unified / "box" / "app" / "memory.max", "max")
    probe = MemoryHeadroomProbe(tree.proc)
    assert probe.cgroup_levels == (CgroupMemoryLevel(2, unified / "box"),)
    assert probe() == 2 * GiB - (GiB + GiB // 2 - GiB // 4)  # 0.75 GiB, far below MemAvailable
    write(unified / "box" / "memory.current", str(2 * GiB + 4096))  # over the limit: no headroom
    write(unified / "box" / "memory.stat", "inactive_file 0\n")
    assert probe() == 0


def test_cgroup_v1_headroom_and_the_smallest_level_wins(tmp_path: Path) -> None:
    tree = Tree(tmp_path, available_gib=1)
    memory = tree.mount("memory", "cgroup", "rw,memory")
    tree.commit("4:memory:/process_api/abc")
    write(memory / "memory.limit_in_bytes", V1_UNLIMITED)
    write(memory / "process_api" / "memory.limit_in_bytes", str(8 * GiB))
    write(memory / "process_api" / "memory.usage_in_bytes", str(GiB))
    write(memory / "process_api" / "memory.stat", f"cache 10\ntotal_inactive_file {GiB // 2}\n")
    write(memory / "process_api" / "abc" / "memory.limit_in_bytes", V1_UNLIMITED)
    levels = find_memory_limited_cgroups(tree.proc)
    assert levels == (CgroupMemoryLevel(1, memory / "process_api"),)
    assert read_cgroup_memory_headroom(levels[0]) == 8 * GiB - GiB // 2
    assert MemoryHeadroomProbe(tree.proc)() == 1 * GiB  # MemAvailable is the smaller here


def test_unreadable_usage_is_ignored(tmp_path: Path) -> None:
    tree = Tree(tmp_path, available_gib=5)
    unified = tree.mount("unified", "cgroup2", "rw")
    tree.commit("0::/box")
    write(unified / "box" / "memory.max", str(GiB))  # limited, but memory.current is missing
    probe = MemoryHeadroomProbe(tree.proc)
    assert len(probe.cgroup_levels) == 1
    assert read_cgroup_memory_headroom(probe.cgroup_levels[0]) is None
    assert probe() == 5 * GiB


def test_missing_proc_files_mean_no_cgroups(tmp_path: Path) -> None:
    assert find_memory_limited_cgroups(tmp_path / "nothing") == ()


def test_this_host() -> None:
    probe = MemoryHeadroomProbe()
    assert 0 < probe() <= int(Path("/proc/meminfo").read_text().split()[1]) * 1024
