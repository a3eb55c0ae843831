"""OverlayPool with a real qemu-storage-daemon (and its qemu-img fallback), real qcow2 files."""

# Blocking local-filesystem checks are fine in tests (ASYNC240).
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox.errors import QemuStorageDaemonError, SandboxInputError
from exec_sandbox.storage.daemon import QemuStorageDaemon
from exec_sandbox.storage.overlay_pool import OverlayPool, PoolState

pytestmark = pytest.mark.integration

BASE_SIZE = 16 * 1024 * 1024
FILL_DEADLINE = 60  # seconds; a deadline against hangs, not a speed assertion


def make_base(path: Path, fmt: str = "qcow2", size: int = BASE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


async def image_info(path: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"qemu-img info {path} failed"
    info: dict[str, Any] = json.loads(out)
    return info


async def assert_overlay_of(overlay: Path, base: Path, size: int = BASE_SIZE) -> None:
    info = await image_info(overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == size


def pooled_files(pool_dir: Path) -> set[Path]:
    return set(pool_dir.glob("*/pool-*.qcow2"))


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_filled(pool: OverlayPool) -> None:
    async with asyncio.timeout(FILL_DEADLINE):
        await pool.wait_filled()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_base(tmp_path / "images" / "python.qcow2")


@pytest.fixture
async def pool(tmp_path: Path, base: Path) -> AsyncIterator[OverlayPool]:
    p = OverlayPool(max_concurrent_vms=4, pool_dir=tmp_path / "pool")
    await p.start([base])
    yield p
    await p.stop()


class TestLifecycle:
    async def test_start_fills_and_stop_removes_everything(self, tmp_path: Path, base: Path) -> None:
        pool_dir = tmp_path / "pool"
        pool = OverlayPool(max_concurrent_vms=3, pool_dir=pool_dir)
        await pool.start([base])
        assert pool.state is PoolState.RUNNING and pool.daemon_enabled
        assert pool.available(base) >= 1  # start() makes the first one itself
        await wait_filled(pool)
        files = pooled_files(pool_dir)
        assert len(files) == 3 == pool.available(base)
        for f in files:
            await assert_overlay_of(f, base)
        assert pool._daemon is not None
        daemon_pid = pool._daemon.pid
        assert daemon_pid is not None

        await pool.stop()
        assert pool.state is PoolState.STOPPED
        assert pool.daemon_enabled is False and pool._daemon is None
        assert pid_gone(daemon_pid)
        assert not pool_dir.exists()  # the pool created it, so the pool removes it
        await pool.stop()
        assert pool.state is PoolState.STOPPED

    async def test_existing_pool_dir_is_kept_but_emptied(self, tmp_path: Path, base: Path) -> None:
        pool_dir = tmp_path / "pool"
        pool_dir.mkdir()
        (pool_dir / "unrelated.txt").write_text("keep me")
        async with OverlayPool(max_concurrent_vms=2, pool_dir=pool_dir) as pool:
            await pool.start([base])  # start while running only registers bases
            await wait_filled(pool)
            assert len(pooled_files(pool_dir)) == 2
        assert sorted(p.name for p in pool_dir.iterdir()) == ["unrelated.txt"]

    async def test_acquire_after_stop_names_the_state(self, tmp_path: Path, base: Path) -> None:
        pool = OverlayPool(max_concurrent_vms=1, pool_dir=tmp_path / "pool")
        await pool.start([base])
        await pool.stop()
        with pytest.raises(SandboxInputError, match=r"not running \(state: stopped\)"):
            await pool.acquire(base, tmp_path / "o.qcow2")

    async def test_bad_base_fails_start_and_leaves_nothing(self, tmp_path: Path) -> None:
        raw = make_base(tmp_path / "raw.img", fmt="raw", size=1024 * 1024)
        pool = OverlayPool(max_concurrent_vms=2, pool_dir=tmp_path / "pool")
        with pytest.raises(QemuStorageDaemonError, match="not qcow2 format"):
            await pool.start([raw])
        with pytest.raises(QemuStorageDaemonError, match="Failed to get image info"):
            await pool.start([tmp_path / "missing.qcow2"])
        assert not (tmp_path / "pool").exists()
        assert pool._daemon is None and not pool.daemon_enabled

    async def test_unusable_pool_dir_is_a_clear_error(self, tmp_path: Path, base: Path) -> None:
        regular = tmp_path / "a-file"
        regular.write_text("x")
        pool = OverlayPool(max_concurrent_vms=1, pool_dir=regular / "pool")
        with pytest.raises(SandboxInputError, match="Cannot use pool_dir"):
            await pool.start([base])
        assert pool.state is PoolState.STOPPED and pool._daemon is None

    async def test_pool_dir_has_one_owner_and_crash_leftovers_are_swept(
        self, tmp_path: Path, base: Path
    ) -> None:
        pool_dir = tmp_path / "pool"
        leftover_dir = pool_dir / "python-0123456789abcdef"
        leftover_dir.mkdir(parents=True)
        leftover = leftover_dir / "pool-deadbeef.qcow2"
        leftover.write_bytes(b"from a crashed run")
        async with OverlayPool(max_concurrent_vms=1, pool_dir=pool_dir) as first:
            await first.start([base])
            assert not leftover.exists()
            second = OverlayPool(max_concurrent_vms=1, pool_dir=pool_dir)
            with pytest.raises(SandboxInputError, match="in use by another OverlayPool"):
                await second.start([base])
            assert first.available(base) >= 1  # the failed second pool did not touch ours


class TestAcquire:
    async def test_hit_renames_a_pooled_overlay(self, pool: OverlayPool, base: Path, tmp_path: Path) -> None:
        await wait_filled(pool)
        before = {p: p.stat().st_ino for p in pooled_files(pool.pool_dir)}
        target = tmp_path / "vm" / "overlay.qcow2"
        target.parent.mkdir()
        assert await pool.acquire(base, target) is True
        gone = [p for p in before if not p.exists()]
        assert len(gone) == 1
        assert target.stat().st_ino == before[gone[0]]  # renamed, not made anew
        await assert_overlay_of(target, base)

    async def test_refill_after_hits(self, pool: OverlayPool, base: Path, tmp_path: Path) -> None:
        await wait_filled(pool)
        for i in range(4):
            assert await pool.acquire(base, tmp_path / f"o{i}.qcow2") is True
        await wait_filled(pool)
        assert pool.available(base) == 4
        assert len(pooled_files(pool.pool_dir)) == 4

    async def test_miss_when_pool_is_empty(self, tmp_path: Path, base: Path) -> None:
        async with OverlayPool(
            max_concurrent_vms=4, pool_dir=tmp_path / "pool", pool_size_per_base=0
        ) as pool:
            await pool.start([base])
            assert await pool.acquire(base, tmp_path / "o.qcow2") is False
            await assert_overlay_of(tmp_path / "o.qcow2", base)
            assert pooled_files(pool.pool_dir) == set()

    async def test_unknown_base_is_made_on_demand_then_pooled(
        self, pool: OverlayPool, tmp_path: Path
    ) -> None:
        other = make_base(tmp_path / "images" / "javascript.qcow2", size=2 * BASE_SIZE)
        assert await pool.acquire(other, tmp_path / "first.qcow2") is False
        await assert_overlay_of(tmp_path / "first.qcow2", other, size=2 * BASE_SIZE)
        await wait_filled(pool)
        assert pool.available(other) == 4
        assert await pool.acquire(other, tmp_path / "second.qcow2") is True
        await assert_overlay_of(tmp_path / "second.qcow2", other, size=2 * BASE_SIZE)

    async def test_concurrent_acquires_never_share_a_file(
        self, pool: OverlayPool, base: Path, tmp_path: Path
    ) -> None:
        await wait_filled(pool)
        targets = [tmp_path / f"vm{i}.qcow2" for i in range(12)]
        results = await asyncio.gather(*(pool.acquire(base, t) for t in targets))
        assert results.count(True) >= 4  # at least the pre-filled ones were hits
        assert len({t.stat().st_ino for t in targets}) == 12
        for t in targets:
            await assert_overlay_of(t, base)
        await wait_filled(pool)
        assert pool.available(base) == 4

    async def test_existing_target_refused(self, pool: OverlayPool, base: Path, tmp_path: Path) -> None:
        target = tmp_path / "taken.qcow2"
        target.write_bytes(b"precious")
        available = pool.available(base)
        with pytest.raises(SandboxInputError, match="already exists"):
            await pool.acquire(base, target)
        assert target.read_bytes() == b"precious"
        assert pool.available(base) == available

    async def test_missing_target_dir_keeps_pooled_overlays(
        self, pool: OverlayPool, base: Path, tmp_path: Path
    ) -> None:
        await wait_filled(pool)
        with pytest.raises(QemuStorageDaemonError, match="No such file or directory"):
            await pool.acquire(base, tmp_path / "no-such-dir" / "o.qcow2")
        assert pool.available(base) == 4
        assert len(pooled_files(pool.pool_dir)) == 4
        assert await pool.acquire(base, tmp_path / "o.qcow2") is True

    async def test_bad_request_errors_pass_through(self, pool: OverlayPool, tmp_path: Path) -> None:
        with pytest.raises(QemuStorageDaemonError, match="Failed to get image info"):
            await pool.acquire(tmp_path / "missing.qcow2", tmp_path / "o.qcow2")
        regular = tmp_path / "a-file"
        regular.write_text("x")
        other = make_base(tmp_path / "images" / "shell.qcow2")
        with pytest.raises(QemuStorageDaemonError, match="Not a directory"):
            await pool.acquire(other, regular / "o.qcow2")
        assert pool.daemon_enabled

    async def test_changed_base_invalidates_pooled_overlays(
        self, pool: OverlayPool, base: Path, tmp_path: Path
    ) -> None:
        await wait_filled(pool)
        stale = pooled_files(pool.pool_dir)
        assert len(stale) == 4
        # Rebuild the base in place with a new size: the old overlays' virtual size is now wrong.
        base.unlink()
        make_base(base, size=2 * BASE_SIZE)
        assert await pool.acquire(base, tmp_path / "o.qcow2") is False
        await assert_overlay_of(tmp_path / "o.qcow2", base, size=2 * BASE_SIZE)
        assert not any(p.exists() for p in stale)
        await wait_filled(pool)
        for f in pooled_files(pool.pool_dir):
            await assert_overlay_of(f, base, size=2 * BASE_SIZE)

    async def test_touched_base_also_invalidates(self, pool: OverlayPool, base: Path, tmp_path: Path) -> None:
        await wait_filled(pool)
        stale = pooled_files(pool.pool_dir)
        st = base.stat()
        os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert await pool.acquire(base, tmp_path / "o.qcow2") is False
        assert not any(p.exists() for p in stale)


class TestDaemonProblems:
    async def test_fallback_to_qemu_img_when_daemon_cannot_run(
        self, tmp_path: Path, base: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="exec_sandbox.storage.overlay_pool")
        daemon = QemuStorageDaemon("/nonexistent/qemu-storage-daemon")
        async with OverlayPool(max_concurrent_vms=2, pool_dir=tmp_path / "pool", daemon=daemon) as pool:
            await pool.start([base])
            assert pool.daemon_enabled is False and pool._daemon is None
            assert "fall back to qemu-img" in caplog.text
            await wait_filled(pool)
            assert await pool.acquire(base, tmp_path / "hit.qcow2") is True
            await assert_overlay_of(tmp_path / "hit.qcow2", base)
            other = make_base(tmp_path / "images" / "other.qcow2")
            assert await pool.acquire(other, tmp_path / "miss.qcow2") is False
            await assert_overlay_of(tmp_path / "miss.qcow2", other)
        assert not (tmp_path / "pool").exists()

    async def test_use_daemon_false(self, tmp_path: Path, base: Path) -> None:
        async with OverlayPool(max_concurrent_vms=1, pool_dir=tmp_path / "pool", use_daemon=False) as pool:
            await pool.start([base])
            assert pool.daemon_enabled is False
            assert await pool.acquire(base, tmp_path / "o.qcow2") is True
            await assert_overlay_of(tmp_path / "o.qcow2", base)

    async def test_shared_daemon_is_not_stopped_by_the_pool(self, tmp_path: Path, base: Path) -> None:
        async with QemuStorageDaemon() as daemon:
            pool = OverlayPool(max_concurrent_vms=1, pool_dir=tmp_path / "pool", daemon=daemon)
            await pool.start([base])
            assert pool.daemon_enabled
            await pool.stop()
            assert pool._daemon is None and not pool.daemon_enabled
            assert daemon.started
            await daemon.create_overlay(base, tmp_path / "still-works.qcow2")

    async def test_daemon_killed_under_the_pool_is_restarted(
        self, pool: OverlayPool, base: Path, tmp_path: Path
    ) -> None:
        await wait_filled(pool)
        daemon = pool._daemon
        assert daemon is not None and daemon.pid is not None
        old_pid = daemon.pid
        os.kill(old_pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while daemon.started:
                await asyncio.sleep(0.01)
        other = make_base(tmp_path / "images" / "other.qcow2")  # not pooled: forces a real creation
        assert await pool.acquire(other, tmp_path / "o.qcow2") is False
        await assert_overlay_of(tmp_path / "o.qcow2", other)
        assert pool.daemon_enabled and daemon.pid != old_pid

    async def test_stop_during_refill_leaves_no_files(self, tmp_path: Path, base: Path) -> None:
        pool_dir = tmp_path / "pool"
        pool = OverlayPool(max_concurrent_vms=32, pool_dir=pool_dir)
        await pool.start([base])
        async with asyncio.timeout(FILL_DEADLINE):
            while pool.available(base) < 3:
                await asyncio.sleep(0)
        assert pool.available(base) < 32  # the refill worker is busy
        await pool.stop()
        assert not pool_dir.exists()
