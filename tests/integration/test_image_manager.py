"""ImageManager: per-VM writable rootfs copies made with a real ``cp``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smartvm.errors import SmartVMError
from smartvm.images import ImageManager

pytestmark = pytest.mark.integration


def read(path: Path) -> bytes:
    return path.read_bytes()


def stat(path: Path) -> os.stat_result:
    return path.stat()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base" / "rootfs.ext4"
    path.parent.mkdir()
    path.write_bytes(os.urandom(256 * 1024))
    return path


async def test_copies_are_private_and_writable(tmp_path: Path, base: Path) -> None:
    images = ImageManager(tmp_path / "data")
    original = read(base)
    one = await images.prepare_rootfs("vm-1", base)
    two = await images.prepare_rootfs("vm_2", str(base))
    assert one == tmp_path / "data" / "vm-rootfs" / "vm-1" / "rootfs.ext4"
    assert read(one) == read(two) == original
    assert stat(one).st_ino != stat(base).st_ino
    write(one, b"guest wrote here")
    assert read(base) == original and read(two) == original
    assert images.rootfs_path("vm-1") == one and images.list() == ["vm-1", "vm_2"]
    assert [p for p in tree(tmp_path / "data") if ".part" in p] == []


async def test_prepare_again_gives_a_fresh_copy(tmp_path: Path, base: Path) -> None:
    images = ImageManager(tmp_path / "data")
    path = await images.prepare_rootfs("vm", base)
    write(path, b"dirty")
    again = await images.prepare_rootfs("vm", base)
    assert again == path and read(again) == read(base)


async def test_sparse_base_stays_sparse(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    write(sparse, b"")
    os.truncate(sparse, 64 * 1024 * 1024)
    copy = await ImageManager(tmp_path / "data").prepare_rootfs("sparse", sparse)
    assert stat(copy).st_size == 64 * 1024 * 1024
    assert stat(copy).st_blocks * 512 < 1024 * 1024


async def test_remove_and_cleanup(tmp_path: Path, base: Path) -> None:
    images = ImageManager(tmp_path / "data")
    other = ImageManager(tmp_path / "data")
    await images.prepare_rootfs("a", base)
    await images.prepare_rootfs("b", base)
    foreign = await other.prepare_rootfs("c", base)
    await images.remove("a")
    await images.remove("a")  # idempotent
    assert images.list() == ["b"] and images.rootfs_path("a") is None
    await images.cleanup()
    await images.cleanup()
    assert images.list() == []
    assert tree(tmp_path / "data" / "vm-rootfs") == ["c", "c/rootfs.ext4"]
    assert read(foreign) == read(base)  # another manager's copy is not ours to delete
    await other.cleanup()
    assert tree(tmp_path / "data" / "vm-rootfs") == []


@pytest.mark.parametrize("vm_id", ["../escape", "a/b", "", ".hidden", "x" * 65, "sp ace"])
async def test_bad_vm_id(tmp_path: Path, base: Path, vm_id: str) -> None:
    images = ImageManager(tmp_path / "data")
    for call in (images.prepare_rootfs(vm_id, base), images.remove(vm_id)):
        with pytest.raises(SmartVMError) as info:
            await call
        assert info.value.code == "INVALID_ARGUMENT"
        assert "vm_id" in info.value.message
    assert tree(tmp_path / "data") == []


async def test_missing_or_bad_base(tmp_path: Path) -> None:
    images = ImageManager(tmp_path / "data")
    for bad in (tmp_path / "nope.ext4", tmp_path):
        with pytest.raises(SmartVMError) as info:
            await images.prepare_rootfs("vm", bad)
        assert info.value.code == "IMAGE_COPY_FAILED"
        assert str(bad) in info.value.message
    assert tree(tmp_path / "data") == []


async def test_unwritable_data_dir(tmp_path: Path, base: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    with pytest.raises(SmartVMError) as info:
        await ImageManager(blocker).prepare_rootfs("vm", base)
    assert info.value.code == "IMAGE_COPY_FAILED"
    assert "cannot create" in info.value.message


async def test_cp_failure_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    # /proc/self/mem is a regular file whose first page is unmapped: cp's read fails with EIO.
    images = ImageManager(tmp_path / "data")
    with pytest.raises(SmartVMError) as info:
        await images.prepare_rootfs("broken", "/proc/self/mem")
    assert info.value.code == "IMAGE_COPY_FAILED"
    assert "cp exit" in info.value.message and info.value.details["stderr"]
    assert tree(tmp_path / "data" / "vm-rootfs") == []
    assert images.list() == []
