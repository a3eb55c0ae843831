"""Owner records, /proc parsing and the runtime-dir default (no processes spawned)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from smartvm.qemu.process import (
    OWNER_FILE,
    OwnerRecord,
    default_runtime_dir,
    process_start_ticks,
    read_owner_record,
    reap_leftovers,
    write_owner_record,
)


def test_start_ticks_of_self_and_of_nothing() -> None:
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None and ticks == process_start_ticks(os.getpid())
    assert process_start_ticks(2**22 + 12345) is None  # above pid_max: never a process


def test_owner_record_round_trip(tmp_path: Path) -> None:
    record = OwnerRecord("vm1", 10, 20, 30, 40, "/run/q/qmp.sock", ["/dev/shm/x.ram"])
    write_owner_record(tmp_path, record)
    assert read_owner_record(tmp_path) == record
    (tmp_path / OWNER_FILE).write_text("{not json")
    assert read_owner_record(tmp_path) is None


def test_runtime_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(tmp_path / "rt"))
    assert default_runtime_dir() == tmp_path / "rt"
    monkeypatch.delenv("SMARTVM_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_runtime_dir() == tmp_path / "smartvm" / "qemu"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert default_runtime_dir() == Path(f"/tmp/smartvm-{os.getuid()}/qemu")


def test_reap_removes_only_stale_unowned_dirs(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    stale = tmp_path / "stale"
    stale.mkdir()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    live = tmp_path / "live"
    live.mkdir()
    write_owner_record(live, OwnerRecord("live", os.getpid(), process_start_ticks(os.getpid())))
    # an owner pid that exists but started at another time is a reused pid: its VM is stale
    reused = tmp_path / "reused"
    reused.mkdir()
    ram = tmp_path / "reused.ram"
    ram.write_bytes(b"x")
    write_owner_record(reused, OwnerRecord("reused", os.getpid(), -1, extra_files=[str(ram)]))
    assert reap_leftovers(tmp_path) == []
    assert fresh.is_dir() and live.is_dir()
    assert not stale.exists() and not reused.exists() and not ram.exists()
    assert reap_leftovers(tmp_path / "absent") == []


def test_sparse_copy_keeps_content_and_holes(tmp_path: Path) -> None:
    from smartvm.qemu.machine import _sparse_copy

    src = tmp_path / "ram"
    size = 8 << 20
    with open(src, "wb") as out:
        out.truncate(size)
        out.seek(1 << 20)
        out.write(b"A" * 4096)
        out.seek(size - 10)
        out.write(b"end-marker")
    dst = tmp_path / "copy"
    _sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == size
    assert dst.stat().st_blocks * 512 < size // 2  # the holes stayed holes
