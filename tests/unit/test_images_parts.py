"""Pure-ish parts of image building: manifests, cache verification, init scripts, rootfs helpers."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from exec_sandbox.errors import ImageBuildError, SandboxInputError
from exec_sandbox.images.builder import ImageBuilder, guest_dir, staged_guest_problems
from exec_sandbox.images.cache import bundle_lock, publish, scratch_dir, verify_artifacts
from exec_sandbox.images.cloud_kernel import initramfs_init, module_load_order
from exec_sandbox.images.debian import deb_file_name
from exec_sandbox.images.manifest import BundleManifest, artifact_for, read_manifest, write_json_atomic
from exec_sandbox.images.recipe import BOOT_ARGS, AptRecord
from exec_sandbox.images.rootfs import SANDBOX_UID, ext4_options, group_file, passwd_file
from exec_sandbox.settings import Settings


def _manifest(tmp_path: Path) -> BundleManifest:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel-bytes")
    rootfs = tmp_path / "rootfs.qcow2"
    rootfs.write_bytes(b"rootfs-bytes" * 100)
    return BundleManifest(
        bundle_id="exec-sandbox-python-0123456789abcdef",
        kernel=artifact_for(kernel),
        rootfs=artifact_for(rootfs),
        boot_args=BOOT_ARGS,
        name="exec_sandbox python image",
        recipe_hash="f" * 64,
        language="python",
        kernel_flavor="compiled",
        kernel_recipe_hash="e" * 64,
        needs_acpi=False,
        packages=[{"name": "python3", "version": "3.11.2-1+b1", "arch": "amd64", "sha256": "0" * 64}],
        build_seconds={"kernel": 200.0},
        rootfs_virtual_size_bytes=1 << 20,
    )


def test_manifest_is_a_smartvm_hosted_manifest(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    write_json_atomic(tmp_path / "manifest.json", manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == 1
    assert data["rootfs_type"] == "qcow2"
    assert data["arch"] == "x86_64"
    assert data["firecracker_version"] == "0.0.0+qemu-microvm"
    for key in ("kernel", "rootfs"):
        entry = data[key]
        assert set(entry) == {"path", "file_name", "sha256", "size_bytes"}
        content = Path(entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["size_bytes"] == len(content)
    assert data["boot_args"].startswith("console=ttyS0")
    assert "root=/dev/vda" in data["boot_args"]
    assert read_manifest(tmp_path / "manifest.json", BundleManifest) == manifest


def test_manifest_is_accepted_by_smartvm(tmp_path: Path) -> None:
    from smartvm.images.manifest import parse_hosted_manifest

    manifest = _manifest(tmp_path)
    hosted = parse_hosted_manifest(manifest.model_dump_json(), origin="test", expected_arch="x86_64")
    assert hosted.rootfs_type == "qcow2"
    assert hosted.kernel.sha256 == manifest.kernel.sha256
    assert hosted.rootfs.path == manifest.rootfs.path
    assert hosted.boot_args == manifest.boot_args


def test_read_manifest_treats_garbage_as_missing(tmp_path: Path) -> None:
    assert read_manifest(tmp_path / "none.json", BundleManifest) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_manifest(tmp_path / "bad.json", BundleManifest) is None
    (tmp_path / "wrong.json").write_text(json.dumps({"schema_version": 1}))
    assert read_manifest(tmp_path / "wrong.json", BundleManifest) is None


def test_verify_detects_corruption_even_after_a_good_stamp(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert verify_artifacts(tmp_path, manifest.artifacts()) == []
    assert (tmp_path / ".verified.json").exists()
    assert verify_artifacts(tmp_path, manifest.artifacts()) == []  # served from the stamp
    rootfs = Path(manifest.rootfs.path)
    time.sleep(0.01)
    with rootfs.open("r+b") as fh:  # same size, different bytes
        fh.write(b"X")
    assert verify_artifacts(tmp_path, manifest.artifacts()) == [f"{rootfs}: sha256 mismatch"]
    rootfs.unlink()
    assert verify_artifacts(tmp_path, manifest.artifacts()) == [f"{rootfs}: missing"]


def test_verify_detects_truncation(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    Path(manifest.kernel.path).write_bytes(b"short")
    problems = verify_artifacts(tmp_path, manifest.artifacts())
    assert len(problems) == 1 and "size 5" in problems[0]


def test_publish_replaces_old_bundle(tmp_path: Path) -> None:
    final = tmp_path / "python-abc"
    final.mkdir()
    (final / "old").write_text("old")
    scratch = scratch_dir(tmp_path, "python-abc")
    assert scratch.parent == tmp_path and scratch.name.startswith(".python-abc.tmp-")
    (scratch / "new").write_text("new")
    publish(scratch, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["python-abc"]


def test_bundle_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    order: list[str] = []
    with bundle_lock(tmp_path, "x"):
        thread = threading.Thread(target=lambda: _take(tmp_path, order))
        thread.start()
        time.sleep(0.2)
        order.append("first released")
    thread.join(5)
    assert order == ["second waiting", "first released", "second acquired"]


def _take(images_dir: Path, order: list[str]) -> None:
    with bundle_lock(images_dir, "x", on_wait=lambda: order.append("second waiting")):
        order.append("second acquired")


def test_init_script_mounts_and_starts_the_agent() -> None:
    text = (guest_dir() / "init").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert os.access(guest_dir() / "init", os.X_OK)
    for needle in (
        "mount -a -T /opt/sbx/fstab",  # see test_fstab_mounts_what_the_guest_needs
        # without that file (e.g. another /opt/sbx), one by one:
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "tmpfs /tmp",
        "tmpfs /dev/shm",
        "mount -t cgroup2 -o nsdelegate,favordynmods cgroup2 /sys/fs/cgroup",
        "mount -o bind /etc/sbx-boot-id /proc/sys/kernel/random/boot_id",
        # a fresh identity each boot (the agent renews it in every restored or forked clone)
        'echo "$U" > /etc/sbx-boot-id',
        'echo "${U//-/}" > /etc/machine-id',
        "echo 32768 > /proc/sys/kernel/pid_max",
        "devtmpfs",
        "mkdir -p /dev/pts /dev/shm",
        "echo sandbox > /proc/sys/kernel/hostname",
        "echo 0 > /proc/sys/kernel/randomize_va_space",
        "ip link set lo up",
        "exec /usr/bin/python3 /opt/sbx/sbx_agent",
        "exec /bin/setpriv --nnp /usr/bin/python3",
        'echo "sbx: no agent"',
        "reboot -f",
    ):
        assert needle in text, needle
    # The agent exec must come before the fallback, or the guest would always reboot.
    assert text.index("exec /usr/bin/python3") < text.index("sbx: no agent")


def test_fstab_mounts_what_the_guest_needs() -> None:
    text = (guest_dir() / "fstab").read_text()
    entries = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert all(len(e) == 6 for e in entries)
    mounts = {e[1]: (e[0], e[2], e[3]) for e in entries}
    assert entries[0][1] == "/proc"  # first: everything after it in init reads /proc
    assert mounts["/proc"][1] == "proc"
    assert mounts["/sys"][1] == "sysfs"
    assert mounts["/sys/fs/cgroup"][1] == "cgroup2"
    for tmp in ("/tmp", "/dev/shm"):
        assert mounts[tmp][1] == "tmpfs" and "mode=1777" in mounts[tmp][2] and "nosuid" in mounts[tmp][2]
    # Unreclaimable tmpfs pages must never pin all guest RAM: together at most half of it.
    sizes = [int(o.removeprefix("size=").removesuffix("%")) for t in ("/tmp", "/dev/shm")
             for o in mounts[t][2].split(",") if o.startswith("size=")]
    assert len(sizes) == 2 and sum(sizes) <= 50, sizes
    # Per-exec cgroups migrate the agent at every spawn: cheap with favordynmods.
    assert "favordynmods" in mounts["/sys/fs/cgroup"][2]
    # boot_id as guest processes see it: a file the agent can renew per clone, bound after /proc.
    assert mounts["/proc/sys/kernel/random/boot_id"] == ("/etc/sbx-boot-id", "none", "bind")
    order = [e[1] for e in entries]
    assert order.index("/proc") < order.index("/proc/sys/kernel/random/boot_id")
    # /sys/fs/cgroup lives on sysfs: it must come after /sys
    assert [e[1] for e in entries].index("/sys") < [e[1] for e in entries].index("/sys/fs/cgroup")


def test_staged_guest_files_must_match_the_hashed_ones(tmp_path: Path) -> None:
    from exec_sandbox.images.recipe import digest_files

    (tmp_path / "sbin").mkdir()
    (tmp_path / "opt/sbx").mkdir(parents=True)
    (tmp_path / "sbin/init").write_text("#!/bin/sh\n")
    (tmp_path / "opt/sbx/agent.py").write_text("print(1)\n")
    expected = {
        "init": digest_files([tmp_path / "sbin/init"])["init"],
        "agent.py": digest_files([tmp_path / "opt/sbx/agent.py"])["agent.py"],
    }
    assert staged_guest_problems(tmp_path, expected) == []
    # edited between hashing and copying: the image would not be what its hash names
    (tmp_path / "opt/sbx/agent.py").write_text("print(2)\n")
    assert staged_guest_problems(tmp_path, expected) == ["agent.py"]
    (tmp_path / "sbin/init").unlink()
    assert staged_guest_problems(tmp_path, expected) == ["agent.py", "init"]


def test_initramfs_init_switches_root() -> None:
    text = initramfs_init()
    assert "insmod" in text and "/dev/vda" in text
    assert "INIT=/sbin/init" in text  # default, overridable with init= like without an initramfs
    assert 'switch_root /newroot "$INIT" "$@"' in text


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    def ko(name: str, depends: str) -> Path:
        path = tmp_path / f"{name}.ko"
        modinfo = b"\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=" + name.encode()
        path.write_bytes(b"\x7fELF junk" + modinfo)
        return path

    index = {
        "ext4": ko("ext4", "mbcache,jbd2,crc16"),
        "jbd2": ko("jbd2", ""),
        "mbcache": ko("mbcache", ""),
        "crc16": ko("crc16", ""),
        "virtio_blk": ko("virtio_blk", ""),
    }
    order = module_load_order(["virtio_blk", "ext4"], index)
    assert order[0] == "virtio_blk" and order[-1] == "ext4"
    assert set(order) == set(index)
    with pytest.raises(ImageBuildError, match="virtio_rng"):
        module_load_order(["virtio_rng"], index)


def test_users_and_filesystem_options() -> None:
    assert f"sandbox:x:{SANDBOX_UID}:1000:sandbox:/home/sandbox:/bin/sh" in passwd_file()
    # uid 1000's first name (whoami) is E2B's "user", its home a link to the work dir
    assert passwd_file("/bin/bash").split("\n")[1] == f"user:x:{SANDBOX_UID}:1000:user:/home/user:/bin/bash"
    assert passwd_file().startswith("root:x:0:0:")
    assert "sandbox:x:1000:" in group_file()
    opts = ext4_options("0123456789abcdef" * 4, 5000)
    assert opts[opts.index("-U") + 1] == "01234567-89ab-cdef-0123-456789abcdef"
    assert "root_owner=0:0" in opts[opts.index("-E") + 1]
    assert opts[opts.index("-N") + 1] == "5000"
    assert ext4_options("0" * 64, 1) != ext4_options("1" * 64, 1)


def test_deb_file_name_escapes_epoch() -> None:
    record = AptRecord(
        "zlib1g", "1:1.2.13.dfsg-1", "amd64", "pool/z/zlib1g_1.2.13.dfsg-1_amd64.deb", "0" * 64, 1
    )
    assert deb_file_name(record) == "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb"


def test_unknown_language_names_the_valid_ones(tmp_path: Path) -> None:
    builder = ImageBuilder(Settings(cache_dir=tmp_path))
    with pytest.raises(SandboxInputError, match="javascript, python, raw") as info:
        builder.bundle_dir("cobol")
    assert info.value.context["language"] == "cobol"
