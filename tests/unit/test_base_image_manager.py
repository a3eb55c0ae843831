"""BaseImageManager with local (``path``) artifacts: cache, LRU, locks, bad input. No network."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from smartvm.errors import SmartVMError
from smartvm.images import BaseImageManager, ProgressEvent
from smartvm.images.cache import BundleCache, BundleLock, lru_victims

# A port nothing listens on: any accidental network use fails fast and locally.
DEAD_URL = "http://127.0.0.1:9"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle_manifest(
    tmp_path: Path, bundle_id: str, *, kernel: bytes = b"kernel", rootfs: bytes = b"rootfs",
    with_sha: bool = True, **extra: Any,
) -> Path:
    assets = tmp_path / f"assets-{bundle_id}"
    assets.mkdir(exist_ok=True)
    (assets / "vmlinux.bin").write_bytes(kernel)
    (assets / "disk.ext4").write_bytes(rootfs)
    data: dict[str, Any] = {
        "schema_version": 1,
        "bundle_id": bundle_id,
        "arch": "x86_64",
        "firecracker_version": "v1.16.1",
        "rootfs_type": "ext4",
        "kernel": {"path": "vmlinux.bin", "size_bytes": len(kernel)},
        "rootfs": {"path": str(assets / "disk.ext4")},
    }
    if with_sha:
        data["kernel"]["sha256"] = sha(kernel)
        data["rootfs"]["sha256"] = sha(rootfs)
    data.update(extra)
    path = assets / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def manager(tmp_path: Path, **kwargs: Any) -> BaseImageManager:
    kwargs.setdefault("arch", "x86_64")
    return BaseImageManager(cache_dir=tmp_path / "cache", lts_base_url=DEAD_URL, **kwargs)


def cache_entries(tmp_path: Path) -> list[str]:
    """Everything in the cache except the lock directory."""
    root = tmp_path / "cache"
    if not root.exists():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != ".locks"
    )


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def set_last_accessed(tmp_path: Path, bundle_id: str, stamp: str) -> None:
    path = tmp_path / "cache" / bundle_id / "manifest.json"
    data = json.loads(path.read_text())
    data["last_accessed_at"] = stamp
    path.write_text(json.dumps(data))


# -- constructor and argument validation ---------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "2"])
def test_invalid_cache_limit(limit: Any) -> None:
    with pytest.raises(SmartVMError) as info:
        BaseImageManager(max_stored_base_images=limit)
    assert info.value.code == "INVALID_BASE_IMAGE_CACHE_LIMIT"


@pytest.mark.parametrize(
    "kwargs",
    [{"arch": "mips"}, {"lts_base_url": "ftp://x"}, {"lts_base_url": "no-scheme"}, {"http_timeout": 0}],
)
def test_invalid_constructor_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SmartVMError) as info:
        BaseImageManager(**kwargs)
    assert info.value.code == "INVALID_ARGUMENT"


def test_accessors(tmp_path: Path) -> None:
    m = BaseImageManager(cache_dir=tmp_path, max_stored_base_images=5, arch="arm64", lts_base_url="http://h/b/")
    assert (m.get_cache_dir(), m.get_max_stored_base_images(), m.get_arch(), m.get_lts_base_url()) == (
        tmp_path, 5, "aarch64", "http://h/b"
    )


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"preset": "nightly"}, "INVALID_PRESET"),
        ({"preset": "hosted"}, "BASE_IMAGE_MANIFEST_FAILED"),
        ({"manifest_path": "a", "manifest_url": "http://127.0.0.1/m"}, "INVALID_ARGUMENT"),
        ({"manifest_path": "a", "ci_version": "v1.1"}, "INVALID_ARGUMENT"),
        ({"ci_version": "1.16"}, "INVALID_ARGUMENT"),
        ({"manifest_url": "file:///etc/passwd"}, "INVALID_ARGUMENT"),
        ({"manifest_path": "/nonexistent/manifest.json"}, "BASE_IMAGE_MANIFEST_FAILED"),
    ],
)
async def test_ensure_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], code: str) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager(tmp_path).ensure_base_image(**kwargs)
    assert info.value.code == code
    assert cache_entries(tmp_path) == []


async def test_manifest_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager(tmp_path).ensure_base_image(manifest_path=tmp_path)
    assert info.value.code == "BASE_IMAGE_MANIFEST_FAILED"
    assert str(tmp_path) in info.value.message


# -- hosted bundles from local paths ------------------------------------------------------


async def test_relative_paths_resolve_against_manifest_dir_and_progress_is_reported(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    path = write_bundle_manifest(tmp_path, "rel", kernel=b"K" * 3000, rootfs=b"R" * 5000, name="Rel bundle")
    bundle = await manager(tmp_path, progress=events.append).ensure_base_image("hosted", manifest_path=path)
    assert Path(bundle.kernel_image_path) == tmp_path / "cache" / "rel" / "vmlinux"
    assert Path(bundle.rootfs_path) == tmp_path / "cache" / "rel" / "rootfs.ext4"
    assert read(bundle.kernel_image_path) == b"K" * 3000
    assert bundle.name == "Rel bundle"
    assert bundle.kernel_size_bytes == 3000 and bundle.rootfs_size_bytes == 5000
    on_disk = json.loads((tmp_path / "cache" / "rel" / "manifest.json").read_text())
    assert on_disk["checksums"] == {"kernel_sha256": sha(b"K" * 3000), "rootfs_sha256": sha(b"R" * 5000)}
    assert on_disk["source"] == {"type": "hosted-manifest", "manifest_path": str(path), "manifest_url": None}
    assert on_disk["last_accessed_at"].endswith("Z")
    kernel_events = [e for e in events if e.artifact == "kernel"]
    assert [e.phase for e in kernel_events] == ["start", "done"]
    assert kernel_events[-1].bytes_done == kernel_events[-1].bytes_total == 3000
    assert {e.artifact for e in events} == {"kernel", "rootfs"}

    events.clear()
    again = await manager(tmp_path, progress=events.append).ensure_base_image(manifest_path=path)
    assert again.created_at == bundle.created_at
    assert [e.phase for e in events] == ["cached", "cached"]


async def test_path_artifact_without_sha256_is_copied_again(tmp_path: Path) -> None:
    path = write_bundle_manifest(tmp_path, "nosha", with_sha=False)
    m = manager(tmp_path)
    first = await m.ensure_base_image(manifest_path=path)
    assert first.checksums.rootfs_sha256 == sha(b"rootfs")
    (tmp_path / "assets-nosha" / "disk.ext4").write_bytes(b"rebuilt")
    second = await m.ensure_base_image(manifest_path=path)
    assert read(second.rootfs_path) == b"rebuilt"
    assert second.checksums.rootfs_sha256 == sha(b"rebuilt")


async def test_sha256_mismatch_of_local_artifact_leaves_nothing(tmp_path: Path) -> None:
    path = write_bundle_manifest(tmp_path, "badsum")
    (tmp_path / "assets-badsum" / "disk.ext4").write_bytes(b"rootfX")  # same size, different bytes
    with pytest.raises(SmartVMError) as info:
        await manager(tmp_path).ensure_base_image(manifest_path=path)
    assert info.value.code == "BASE_IMAGE_CHECKSUM_MISMATCH"
    assert "sha256" in info.value.message
    assert cache_entries(tmp_path) == []


async def test_size_mismatch_of_local_artifact(tmp_path: Path) -> None:
    path = write_bundle_manifest(tmp_path, "badsize")
    data = json.loads(path.read_text())
    data["kernel"]["size_bytes"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(SmartVMError) as info:
        await manager(tmp_path).ensure_base_image(manifest_path=path)
    assert info.value.code == "BASE_IMAGE_CHECKSUM_MISMATCH"
    assert "size" in info.value.message
    assert cache_entries(tmp_path) == []


async def test_missing_local_artifact(tmp_path: Path) -> None:
    path = write_bundle_manifest(tmp_path, "missing")
    (tmp_path / "assets-missing" / "disk.ext4").unlink()
    with pytest.raises(SmartVMError) as info:
        await manager(tmp_path).ensure_base_image(manifest_path=path)
    assert info.value.code == "BASE_IMAGE_NOT_FOUND"
    assert "disk.ext4" in info.value.message
    assert cache_entries(tmp_path) == []


async def test_stray_files_are_removed_on_ensure(tmp_path: Path) -> None:
    path = write_bundle_manifest(tmp_path, "strays")
    m = manager(tmp_path)
    await m.ensure_base_image(manifest_path=path)
    (tmp_path / "cache" / "strays" / ".vmlinux.dead.part").write_bytes(b"crashed download")
    (tmp_path / "cache" / "strays" / "old-kernel").write_bytes(b"renamed artifact")
    await m.ensure_base_image(manifest_path=path)
    assert sorted(p.name for p in (tmp_path / "cache" / "strays").iterdir()) == [
        "manifest.json", "rootfs.ext4", "vmlinux"
    ]


async def test_corrupt_cached_manifest_is_rebuilt(tmp_path: Path) -> None:
    path = write_bundle_manifest(tmp_path, "rebuild")
    m = manager(tmp_path)
    await m.ensure_base_image(manifest_path=path)
    (tmp_path / "cache" / "rebuild" / "manifest.json").write_text("{broken")
    assert await m.list_base_images() == []
    bundle = await m.ensure_base_image(manifest_path=path)
    assert [b.bundle_id for b in await m.list_base_images()] == [bundle.bundle_id]


# -- LRU ----------------------------------------------------------------------------------


async def test_lru_eviction_follows_use(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = manager(tmp_path, max_stored_base_images=2)
    paths = {name: write_bundle_manifest(tmp_path, name) for name in ("a", "b", "c")}
    await m.ensure_base_image(manifest_path=paths["a"])
    await m.ensure_base_image(manifest_path=paths["b"])
    set_last_accessed(tmp_path, "a", "2024-01-01T00:00:00.000Z")
    set_last_accessed(tmp_path, "b", "2024-01-02T00:00:00.000Z")
    # Using "a" again makes it the most recently used, so "b" is the one to go.
    touched = await m.ensure_base_image(manifest_path=paths["a"])
    assert touched.last_accessed_at.year > 2024
    with caplog.at_level(logging.WARNING, logger="smartvm.images"):
        await m.ensure_base_image(manifest_path=paths["c"])
    assert [b.bundle_id for b in await m.list_base_images()] == ["c", "a"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "Evicting old base image bundle b" in warnings[0]
    assert not (tmp_path / "cache" / "b").exists()


async def test_prune_under_limit_and_keep(tmp_path: Path) -> None:
    m = manager(tmp_path, max_stored_base_images=1)
    assert await m.prune_base_image_cache() == []
    for name in ("x", "y"):
        path = write_bundle_manifest(tmp_path, name)
        await BaseImageManager(cache_dir=tmp_path / "cache", max_stored_base_images=5, arch="x86_64",
                               lts_base_url=DEAD_URL).ensure_base_image(manifest_path=path)
    set_last_accessed(tmp_path, "x", "2024-01-01T00:00:00.000Z")
    # "x" is the oldest, but kept on request: the next oldest goes instead.
    assert await m.prune_base_image_cache(keep_bundle_id="x") == ["y"]


async def test_prune_skips_a_bundle_being_ensured(tmp_path: Path) -> None:
    m = manager(tmp_path, max_stored_base_images=5)
    for name in ("p", "q", "r"):
        await m.ensure_base_image(manifest_path=write_bundle_manifest(tmp_path, name))
    set_last_accessed(tmp_path, "p", "2024-01-01T00:00:00.000Z")
    set_last_accessed(tmp_path, "q", "2024-01-02T00:00:00.000Z")
    small = manager(tmp_path, max_stored_base_images=2)
    lock = BundleCache(tmp_path / "cache").lock("p")
    assert lock.try_acquire()
    try:
        assert await small.prune_base_image_cache() == ["q"]
    finally:
        lock.release()
    assert (tmp_path / "cache" / "p").exists()


def test_lru_victims_is_pure() -> None:
    assert lru_victims([], 2) == []


async def test_remove_base_image(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.ensure_base_image(manifest_path=write_bundle_manifest(tmp_path, "gone"))
    assert (await m.get_base_image("gone")) is not None
    assert await m.remove_base_image("gone") is True
    assert await m.remove_base_image("gone") is False
    assert await m.get_base_image("gone") is None
    assert cache_entries(tmp_path) == []
    for bad in ("../cache", "a/b", ".locks"):
        with pytest.raises(SmartVMError) as info:
            await m.remove_base_image(bad)
        assert info.value.code == "INVALID_ARGUMENT"


async def test_list_ignores_foreign_entries(tmp_path: Path) -> None:
    m = manager(tmp_path)
    await m.ensure_base_image(manifest_path=write_bundle_manifest(tmp_path, "real"))
    (tmp_path / "cache" / "empty-dir").mkdir()
    (tmp_path / "cache" / "a file").write_text("x")
    assert [b.bundle_id for b in await m.list_base_images()] == ["real"]


# -- locks -----------------------------------------------------------------------------------


async def test_bundle_lock_excludes_within_one_process(tmp_path: Path) -> None:
    first, second = BundleLock(tmp_path / "l.lock"), BundleLock(tmp_path / "l.lock")
    async with first:
        assert first.held
        assert not second.try_acquire()
        waiter = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.1)
        assert not waiter.done()
    await asyncio.wait_for(waiter, 10)
    assert second.held
    second.release()
    second.release()  # idempotent
    assert not second.held


async def test_cancelled_lock_waiter_leaves_no_lock(tmp_path: Path) -> None:
    holder, waiter_lock = BundleLock(tmp_path / "c.lock"), BundleLock(tmp_path / "c.lock")
    assert holder.try_acquire()
    waiter = asyncio.create_task(waiter_lock.acquire())
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    holder.release()
    assert not waiter_lock.held
    assert BundleLock(tmp_path / "c.lock").try_acquire()


async def test_empty_artifact_progress_and_a_failing_progress_callback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[ProgressEvent] = []

    def broken(event: ProgressEvent) -> None:
        events.append(event)
        raise RuntimeError("progress bar crashed")

    path = write_bundle_manifest(tmp_path, "empty", kernel=b"", rootfs=b"r")
    with caplog.at_level(logging.ERROR, logger="smartvm.images"):
        bundle = await manager(tmp_path, progress=broken).ensure_base_image(manifest_path=path)
    assert read(bundle.kernel_image_path) == b""
    assert [(e.phase, e.bytes_done) for e in events if e.artifact == "kernel"] == [("start", 0), ("done", 0)]
    assert any("progress callback failed" in r.getMessage() for r in caplog.records)
