"""smartvm.hostfs and smartvm.leftovers without VMs: private dirs, atomic writes, the reaper's rules."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from smartvm.errors import SmartVMError
from smartvm.hostfs import (
    UnsafePathError,
    atomic_write_file,
    atomic_writer,
    ensure_private_dir,
    private_copy,
    remove_at,
    verify_private_dir,
)
from smartvm.leftovers import (
    OwnerRecord,
    make_owned_dir,
    new_owner_record,
    private_runtime_dir,
    private_shm_dir,
    read_owner_record,
    reap,
    write_owner_record,
    write_sidecar_record,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_ensure_private_dir_creates_every_component_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    assert ensure_private_dir(target) == target
    for path in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert _mode(path) == 0o700
    assert verify_private_dir(target)


def test_ensure_private_dir_refuses_symlinks_and_loose_dirs(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafePathError, match="symbolic link") as info:
        ensure_private_dir(tmp_path / "link")
    assert isinstance(info.value, SmartVMError) and info.value.code == "UNSAFE_PATH"
    assert info.value.path == tmp_path / "link" and info.value.problem == "is a symbolic link"
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        ensure_private_dir(open_dir)
    with pytest.raises(UnsafePathError, match="ancestor"):  # whoever may write there could swap it
        ensure_private_dir(open_dir / "inner")
    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o755)  # ours and writable by nobody else: tightened, not refused
    ensure_private_dir(readable)
    assert _mode(readable) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private_dir(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        ensure_private_dir(tmp_path / "missing", create=False)


def test_atomic_write_file_is_private_and_refuses_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "out"
    atomic_write_file(target, b"one")
    assert target.read_bytes() == b"one" and _mode(target) == 0o600
    atomic_write_file(target, [b"t", b"wo"], mode=0o644)
    assert target.read_bytes() == b"two" and _mode(target) == 0o644
    with pytest.raises(UnsafePathError) as info:
        atomic_write_file(target, b"three", overwrite=False)
    assert info.value.code == "PATH_EXISTS" and target.read_bytes() == b"two"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        atomic_write_file(link, b"evil")
    assert victim.read_bytes() == b"keep"
    atomic_write_file(link, b"followed", follow_symlinks=True)  # asked for: writes the file it names
    assert victim.read_bytes() == b"followed" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out", "victim"]


def test_atomic_writer_streams_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "stream"
    with atomic_writer(target) as out:
        out.file.write(b"a")
        assert not target.exists() and out.tmp_path.parent == tmp_path
        out.file.write(b"b")
    assert target.read_bytes() == b"ab"
    with pytest.raises(RuntimeError), atomic_writer(target) as out:
        out.file.write(b"partial")
        raise RuntimeError("the transfer broke")
    assert target.read_bytes() == b"ab"
    assert [p.name for p in tmp_path.iterdir()] == ["stream"]


def test_private_copy_is_exclusive_and_private(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 3_000_000)
    src.chmod(0o644)
    private_copy(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes() and _mode(tmp_path / "dst") == 0o600
    with pytest.raises(FileExistsError):
        private_copy(src, tmp_path / "dst")
    (tmp_path / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        private_copy(src, tmp_path / "planted")
    assert not (tmp_path / "elsewhere").exists()


def test_remove_at_never_follows_symlinks(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("x")
    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "link").symlink_to(keep)
    fd = os.open(scan, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert remove_at(fd, "link")
        with pytest.raises(ValueError):
            remove_at(fd, "../keep")
    finally:
        os.close(fd)
    assert (keep / "file").exists() and not (scan / "link").exists()


def test_records_are_read_only_from_regular_files_of_ours(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir(mode=0o700)
    record = new_owner_record("vm", kind="vm")
    write_owner_record(vm, record)
    assert read_owner_record(vm) == record and _mode(vm / "owner.json") == 0o600
    (vm / "owner.json").chmod(0o666)  # writable by anyone: not trusted
    assert read_owner_record(vm) is None
    (vm / "owner.json").unlink()
    (vm / "owner.json").symlink_to(tmp_path / "elsewhere.json")
    write_owner_record(tmp_path, record)
    os.replace(tmp_path / "owner.json", tmp_path / "elsewhere.json")
    assert read_owner_record(vm) is None  # a symlinked record is not read
    (vm / "owner.json").unlink()
    (vm / "owner.json").write_text('{"vm_id": "vm", "owner_pid": "1; rm -rf /", "owner_start": 1}')
    assert read_owner_record(vm) is None


def test_reaper_keeps_live_owners_and_symlinked_dirs(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    live = make_owned_dir(runtime, "pool-", kind="overlay-pool")
    old = 1_000_000.0
    os.utime(live, (old, old))  # ancient, but its owner (we) lives
    dead = runtime / "dead"
    dead.mkdir(mode=0o700)
    write_owner_record(dead, OwnerRecord("dead", _dead_pid(), 1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    write_owner_record(elsewhere, OwnerRecord("x", _dead_pid(), 1))
    (runtime / "link").symlink_to(elsewhere)
    overlay = runtime / "sbx-1-vm.qcow2"
    overlay.write_bytes(b"x")
    write_sidecar_record(overlay, OwnerRecord("vm", _dead_pid(), 1, kind="overlay"))
    report = reap(runtime, min_age=0.0)
    assert sorted(p.name for p in report.removed) == ["dead", "sbx-1-vm.qcow2"]
    assert live.is_dir() and elsewhere.is_dir() and (runtime / "link").is_symlink()
    assert sorted(p.name for p in runtime.iterdir()) == ["link", live.name]


def test_reaper_leaves_a_directory_it_cannot_verify(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    runtime.chmod(0o777)
    dead = runtime / "dead"
    dead.mkdir(mode=0o700)
    write_owner_record(dead, OwnerRecord("dead", _dead_pid(), 1))
    assert reap(runtime, min_age=0.0).removed == []
    assert dead.is_dir()


def test_private_runtime_dir_falls_back_when_the_default_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.delenv("SMARTVM_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    (shared / "smartvm").mkdir()
    (shared / "smartvm").chmod(0o777)  # someone made it before us, open to all
    chosen = private_runtime_dir()
    assert not chosen.is_relative_to(shared / "smartvm") and chosen.name == "qemu"
    assert verify_private_dir(chosen) and verify_private_dir(chosen.parent)
    assert private_runtime_dir() == chosen  # one fallback per process
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(shared / "smartvm"))
    with pytest.raises(UnsafePathError):  # an explicit choice is never replaced silently
        private_runtime_dir()


def test_private_shm_dir_falls_back_when_its_name_is_taken(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    shm.chmod(0o1777)
    assert private_shm_dir(shm) == shm / f"smartvm-{os.geteuid()}"
    assert _mode(shm / f"smartvm-{os.geteuid()}") == 0o700
    other = tmp_path / "shm2"
    other.mkdir()
    other.chmod(0o1777)
    (other / f"smartvm-{os.geteuid()}").symlink_to(tmp_path)  # planted
    chosen = private_shm_dir(other)
    assert chosen.parent == other and chosen.name.startswith(f"smartvm-{os.geteuid()}-")
    assert verify_private_dir(chosen)
