"""Snapshot cache keys and entry checks, without VMs: every input that shapes a guest changes the key."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from exec_sandbox.images.manifest import Artifact, BundleManifest
from exec_sandbox.protocol.agent import PROTOCOL_VERSION
from exec_sandbox.settings import Settings
from exec_sandbox.vm.snapshot_entries import (
    CACHE_FORMAT,
    SnapshotKeyInputs,
    SnapshotManifest,
    build_key_inputs,
    cacheable_reason,
    parse_qemu_version,
)
from exec_sandbox.vm.snapshots import SnapshotCache
from exec_sandbox.vm.spec import SNAPSHOT_FORMAT, PortForward, VmOptions
from smartvm.leftovers import OwnerRecord, write_owner_record

QEMU = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"


def artifact(name: str, digest_char: str) -> Artifact:
    return Artifact(path=f"/images/{name}", file_name=name, sha256=digest_char * 64, size_bytes=1)


def manifest(**changes: object) -> BundleManifest:
    base: dict[str, object] = {
        "bundle_id": "python-1",
        "kernel": artifact("vmlinux", "a"),
        "rootfs": artifact("rootfs.qcow2", "b"),
        "boot_args": "console=ttyS0 quiet",
        "name": "python",
        "recipe_hash": "c" * 64,
        "language": "python",
        "kernel_flavor": "compiled",
        "kernel_recipe_hash": "d" * 64,
        "needs_acpi": False,
        "packages": [],
        "build_seconds": {},
        "rootfs_virtual_size_bytes": 1,
    }
    return BundleManifest.model_validate({**base, **changes})


OPTIONS = VmOptions(language="python", memory_mb=256, vcpus=1)


def key(
    options: VmOptions = OPTIONS,
    bundle: BundleManifest | None = None,
    qemu: str = QEMU,
    accel: str = "tcg",
    spare: bool = True,
) -> str:
    inputs = build_key_inputs(
        options, bundle or manifest(), qemu_version=qemu, accelerator=accel, warmup_spare=spare
    )
    return inputs.key()


def test_key_is_stable_and_hex() -> None:
    assert key() == key()
    assert len(key()) == 40 and int(key(), 16) >= 0


def test_boot_timeout_does_not_change_the_key() -> None:
    assert key(OPTIONS.model_copy(update={"boot_timeout_s": 5.0})) == key()


@pytest.mark.parametrize(
    "options",
    [
        OPTIONS.model_copy(update={"language": "javascript"}),
        OPTIONS.model_copy(update={"memory_mb": 512}),
        OPTIONS.model_copy(update={"vcpus": 2}),
        OPTIONS.model_copy(update={"env": {"A": "1"}}),
        OPTIONS.model_copy(update={"kernel_args": ("foo=1",)}),
        OPTIONS.model_copy(update={"kernel_cmdline": "console=ttyS0"}),
        OPTIONS.model_copy(update={"kernel_flavor": "debian-cloud"}),
        OPTIONS.model_copy(update={"accel": "tcg"}),
        OPTIONS.model_copy(update={"shared_memory": True}),
        OPTIONS.model_copy(update={"disk_size_mb": 2048}),
    ],
    ids=["language", "memory", "vcpus", "env", "kernel_args", "cmdline", "flavor", "accel_opt", "shm",
         "disk"],
)
def test_every_vm_option_changes_the_key(options: VmOptions) -> None:
    assert key(options) != key()


@pytest.mark.parametrize(
    "bundle",
    [
        manifest(rootfs=artifact("rootfs.qcow2", "e")),
        manifest(kernel=artifact("vmlinux", "e")),
        manifest(initrd=artifact("initrd.img", "e")),
        manifest(recipe_hash="e" * 64),
        manifest(kernel_recipe_hash="e" * 64),
        manifest(boot_args="console=ttyS0"),
    ],
    ids=["rootfs", "kernel", "initrd", "recipe", "kernel_recipe", "boot_args"],
)
def test_every_image_input_changes_the_key(bundle: BundleManifest) -> None:
    assert key(bundle=bundle) != key()


def test_qemu_accelerator_and_warmup_change_the_key() -> None:
    assert key(qemu=QEMU.replace("7.2.22", "8.0.0")) != key()
    assert key(qemu=QEMU.replace("deb12u18", "deb12u19")) != key()
    assert key(accel="kvm") != key()
    assert key(spare=False) != key()


def test_versions_are_recorded_in_the_inputs() -> None:
    inputs = build_key_inputs(OPTIONS, manifest(), qemu_version=QEMU, accelerator="tcg", warmup_spare=True)
    assert inputs.agent_protocol_version == PROTOCOL_VERSION
    assert inputs.snapshot_format == SNAPSHOT_FORMAT
    assert inputs.cache_format == CACHE_FORMAT
    for field, value in (("agent_protocol_version", PROTOCOL_VERSION + 1), ("snapshot_format", 99)):
        assert inputs.model_copy(update={field: value}).key() != inputs.key()


def test_parse_qemu_version() -> None:
    assert parse_qemu_version(QEMU + "\nCopyright (c) 2003-2022\n") == QEMU
    with pytest.raises(ValueError, match="not a QEMU"):
        parse_qemu_version("bash: qemu: not found")
    with pytest.raises(ValueError, match="not a QEMU"):
        parse_qemu_version("")


def test_networked_and_forwarding_guests_are_not_cacheable() -> None:
    assert cacheable_reason(OPTIONS) is None
    assert "network" in (cacheable_reason(OPTIONS.model_copy(update={"network": True})) or "")
    forward = PortForward(guest_port=80, host_port=18080)
    assert "port" in (cacheable_reason(OPTIONS.model_copy(update={"port_forwards": (forward,)})) or "")


def test_key_inputs_reject_unknown_fields() -> None:
    data = build_key_inputs(
        OPTIONS, manifest(), qemu_version=QEMU, accelerator="tcg", warmup_spare=True
    ).model_dump()
    with pytest.raises(ValueError, match="Extra inputs"):
        SnapshotKeyInputs.model_validate({**data, "surprise": 1})


# ----------------------------------------------------------------------------- entries on disk


def write_entry(cache: SnapshotCache, files: dict[str, bytes]) -> str:
    from exec_sandbox.vm.snapshot_entries import write_manifest as _write_manifest

    inputs = build_key_inputs(OPTIONS, manifest(), qemu_version=QEMU, accelerator="tcg", warmup_spare=True)
    k = inputs.key()
    tmp = cache.cache_dir / f".tmp-{k}-{os.getpid()}-00"
    (tmp / "snapshot").mkdir(parents=True)
    for rel, data in files.items():
        (tmp / "snapshot" / rel).write_bytes(data)
    _write_manifest(tmp, k, inputs, "vm1")
    os.rename(tmp, cache.entry_dir(k))
    return k


def test_verify_accepts_intact_entries_and_names_the_corruption(tmp_path: Path) -> None:
    from exec_sandbox.vm.snapshot_entries import CorruptEntry as _Corrupt
    from exec_sandbox.vm.snapshot_entries import verify_entry as _verify_entry

    cache = SnapshotCache(tmp_path, settings=Settings(cache_dir=tmp_path / "c"))
    base = tmp_path / "rootfs.qcow2"
    base.write_bytes(b"base")
    sandbox_json = json.dumps({"base_image": str(base)}).encode()
    k = write_entry(cache, {"vmstate": b"state" * 100, "memory": b"\0" * 4096, "sandbox.json": sandbox_json})
    entry = cache.entry_dir(k)
    assert isinstance(_verify_entry(entry, k), SnapshotManifest)
    base.unlink()
    with pytest.raises(_Corrupt, match=r"base image .* no longer exists"):
        _verify_entry(entry, k)
    base.write_bytes(b"base")

    (entry / "snapshot" / "memory").write_bytes(b"\1" + b"\0" * 4095)  # same size, other bytes
    with pytest.raises(_Corrupt, match="memory has sha256"):
        _verify_entry(entry, k)
    (entry / "snapshot" / "memory").write_bytes(b"\0" * 10)
    with pytest.raises(_Corrupt, match="memory has 10 bytes"):
        _verify_entry(entry, k)
    (entry / "snapshot" / "memory").unlink()
    with pytest.raises(_Corrupt, match="differ from the manifest"):
        _verify_entry(entry, k)
    with pytest.raises(_Corrupt, match="does not belong"):
        _verify_entry(entry, "0" * 40)
    (entry / "manifest.json").write_text("{")
    with pytest.raises(_Corrupt, match="manifest unreadable"):
        _verify_entry(entry, k)


async def test_discard_waits_for_restorers_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    cache = SnapshotCache(
        tmp_path, settings=Settings(cache_dir=tmp_path / "c"), max_entries=1, lock_timeout_s=0.2
    )
    k = write_entry(cache, {"vmstate": b"x"})
    # A restorer in another process holds the entry's shared lock: discard gives up, entry stays.
    lock_path = cache.cache_dir / ".locks" / f"{k}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert await cache.discard(k) is False
        assert cache.entries() == [k]
        assert await cache.prune(max_entries=0) == []  # busy entries are skipped
    finally:
        os.close(fd)
    # Leftovers of a dead writer and of an interrupted delete are swept by prune.
    dead_writer = cache.cache_dir / f".tmp-{'1' * 40}-ab"
    dead_writer.mkdir(mode=0o700)
    # whose dir it is: the owner record (smartvm.leftovers), here of a process that is gone
    write_owner_record(dead_writer, OwnerRecord(dead_writer.name, 999999999, 1, kind="snapshot-write"))
    (cache.cache_dir / f".trash-{'2' * 40}-ab").mkdir()
    assert await cache.prune() == []  # one entry, max_entries=1
    assert sorted(p.name for p in cache.cache_dir.iterdir()) == [".locks", k]
    assert await cache.prune(max_entries=0) == [k]
    assert cache.entries() == []
    assert await cache.discard(k) is False  # already gone
