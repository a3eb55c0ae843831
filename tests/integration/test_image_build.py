"""Build (or reuse from the cache) the python image and check it for real: manifest, qcow2, contents,
a TCG boot through the image's own /sbin/init, and corruption -> rebuild."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from exec_sandbox.images.builder import guest_dir
from exec_sandbox.images.progress import ProgressEvent, ProgressKind
from exec_sandbox.settings import Settings
from exec_sandbox.vm_manager import ImageBundle, VmManager

# The first run compiles the kernel (minutes on 2 cores); later runs reuse the cache.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

BOOT_TIMEOUT = 180


@pytest.fixture(scope="module")
def bundle() -> ImageBundle:
    return VmManager(Settings()).get_bundle("python")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_matches_artifacts(bundle: ImageBundle) -> None:
    data = json.loads(bundle.manifest.read_text())
    assert data["schema_version"] == 1
    assert data["rootfs_type"] == "qcow2"
    assert data["language"] == "python"
    assert data["recipe_hash"] == bundle.recipe_hash
    for key in ("kernel", "rootfs"):
        path = Path(data[key]["path"])
        assert path.is_file()
        assert data[key]["sha256"] == _sha256(path)
        assert data[key]["size_bytes"] == path.stat().st_size
    names = {p["name"] for p in data["packages"]}
    assert {"python3", "busybox-static", "libc6"} <= names
    assert not names & {"dpkg", "perl-base", "debconf"}
    argv = ["qemu-img", "info", "--output=json", str(bundle.rootfs)]
    info = json.loads(subprocess.run(argv, capture_output=True, check=True, text=True).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == data["rootfs_virtual_size_bytes"]


def test_get_base_image_is_cached_and_stable(bundle: ImageBundle) -> None:
    manager = VmManager(Settings())
    before = bundle.rootfs.stat().st_ino
    assert manager.get_base_image("python") == bundle.rootfs
    assert bundle.rootfs.stat().st_ino == before
    assert manager.get_kernel() == bundle.kernel


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, check=True, text=True
    ).stdout


def test_rootfs_contents(bundle: ImageBundle, tmp_path: Path) -> None:
    raw = tmp_path / "root.ext4"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(bundle.rootfs), str(raw)], check=True)
    init = _debugfs(raw, "cat /sbin/init")
    assert init == (guest_dir() / "init").read_text()
    listing = _debugfs(raw, "ls -p /opt/sbx")
    shipped = {p.name for p in guest_dir().iterdir() if p.is_file() and p.name != "init"}
    assert {f"/{name}/" in listing for name in shipped} == ({True} if shipped else set())
    assert "sandbox:x:1000:1000:" in _debugfs(raw, "cat /etc/passwd")
    home = _debugfs(raw, "stat /home/sandbox")
    assert "User:  1000" in home and "Group:  1000" in home
    python = _debugfs(raw, "stat /usr/bin/python3.11")
    assert "User:     0" in python
    assert "/busybox" in _debugfs(raw, "stat /bin/sh")


def _boot(bundle: ImageBundle, extra_disk: Path, init_cmd: str) -> str:
    # auto-kernel-cmdline=off: QEMU would append virtio_mmio.device= after our "--", where they would
    # become arguments of init. These are microvm's first two virtio-mmio slots in device order.
    mmio = "virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11"
    append = f'{bundle.boot_args.replace(" init=/sbin/init", "")} {mmio} init=/bin/sh -- -c "{init_cmd}"'
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off,auto-kernel-cmdline=off", "-accel", "tcg",
        "-nodefaults", "-no-user-config", "-nographic", "-m", "256", "-no-reboot",
        "-kernel", str(bundle.kernel), "-append", append, "-serial", "stdio",
        "-drive", f"id=root,file={bundle.rootfs},format=qcow2,if=none,snapshot=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=extra,file={extra_disk},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=extra",
        "-device", "virtio-rng-device",
    ]
    # subprocess.run kills QEMU if the timeout expires, so no guest outlives a hung boot.
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_boot_runs_init_and_starts_the_agent(bundle: ImageBundle, tmp_path: Path) -> None:
    """Boot the image under TCG with a stand-in agent mounted over /opt/sbx: the image's own
    /sbin/init must prepare the mounts and exec the agent as PID 1."""
    agent_dir = tmp_path / "agent"
    (agent_dir / "sbx_agent").mkdir(parents=True)
    (agent_dir / "sbx_agent" / "__main__.py").write_text(
        "import os, pwd\n"
        "host = open('/etc/hostname').read().strip()\n"
        "print('SBX-TEST pid=%d host=%s uid=%d sandbox=%d'\n"
        "      % (os.getpid(), host, os.getuid(), pwd.getpwnam('sandbox').pw_uid), flush=True)\n"
        "print(open('/proc/mounts').read(), flush=True)\n"
        "print('SBX-TEST end', flush=True)\n"
        "os.execv('/sbin/reboot', ['reboot', '-f'])\n"
    )
    disk = tmp_path / "agent.ext4"
    with disk.open("wb") as fh:
        fh.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(agent_dir), str(disk)], check=True)
    out = _boot(bundle, disk, "mount -t ext4 -o ro /dev/vdb /opt/sbx && exec /sbin/init")
    assert "SBX-TEST pid=1 host=sandbox uid=0 sandbox=1000" in out, out[-3000:]
    mounts = {line.split()[1]: line.split()[2] for line in out.split("SBX-TEST end")[0].splitlines()
              if len(line.split()) >= 3 and line.split()[1].startswith("/")}
    assert mounts["/"] == "ext4"
    assert mounts["/proc"] == "proc"
    assert mounts["/sys"] == "sysfs"
    assert mounts["/dev"] == "devtmpfs"
    assert mounts["/tmp"] == "tmpfs"
    assert mounts["/dev/shm"] == "tmpfs"
    assert mounts["/sys/fs/cgroup"] == "cgroup2"


def _private_images_dir(bundle: ImageBundle, tmp_path: Path) -> Path:
    """A fresh images dir holding a copy of the compiled kernel bundle (so nothing recompiles)."""
    images = tmp_path / "images"
    images.mkdir()
    kernel_dir = bundle.kernel.parent
    shutil.copytree(kernel_dir, images / kernel_dir.name)
    # Manifests hold absolute paths: point the copied kernel manifest at its new place.
    kjson = images / kernel_dir.name / "kernel.json"
    kjson.write_text(kjson.read_text().replace(str(kernel_dir), str(images / kernel_dir.name)))
    return images


def test_concurrent_first_use_builds_once(bundle: ImageBundle, tmp_path: Path) -> None:
    images = _private_images_dir(bundle, tmp_path)
    events: list[ProgressEvent] = []
    results: list[ImageBundle] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            manager = VmManager(Settings(images_dir=images), progress=events.append)
            results.append(manager.get_bundle("python"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    builds = [e for e in events if e.step == "rootfs: extract packages" and e.kind is ProgressKind.START]
    assert len(builds) == 1
    assert not [e for e in events if e.step.startswith("kernel:")]


def test_corrupt_artifact_is_rebuilt(bundle: ImageBundle, tmp_path: Path) -> None:
    """In a private images dir (the shared cache stays untouched): build, corrupt, get again."""
    images = _private_images_dir(bundle, tmp_path)
    kernel_dir = bundle.kernel.parent
    settings = Settings(images_dir=images)
    manager = VmManager(settings)
    first = manager.get_bundle("python")
    assert first.directory.parent == images
    assert first.directory.name == f"python-{first.recipe_hash[:16]}"
    assert json.loads(first.manifest.read_text())["recipe_hash"] == first.recipe_hash
    assert _sha256(first.rootfs) == json.loads(first.manifest.read_text())["rootfs"]["sha256"]
    good_sha = _sha256(first.rootfs)

    with first.rootfs.open("r+b") as fh:
        fh.seek(first.rootfs.stat().st_size // 2)
        fh.write(os.urandom(64))
    assert _sha256(first.rootfs) != good_sha

    again = manager.get_bundle("python")
    assert again.rootfs == first.rootfs
    assert _sha256(again.rootfs) == json.loads(again.manifest.read_text())["rootfs"]["sha256"]
    assert again.kernel.parent == images / kernel_dir.name  # the kernel was not rebuilt
    assert not [p for p in images.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


async def test_smartvm_ingests_the_bundle(bundle: ImageBundle, tmp_path: Path) -> None:
    from smartvm.images.base_images import BaseImageManager

    ingested = await BaseImageManager(cache_dir=tmp_path / "smartvm").ensure_base_image(
        manifest_path=bundle.manifest
    )
    assert ingested.rootfs_type == "qcow2"
    assert _sha256(Path(ingested.rootfs_path)) == _sha256(bundle.rootfs)
    assert _sha256(Path(ingested.kernel_image_path)) == _sha256(bundle.kernel)
    assert ingested.boot_args == bundle.boot_args


async def test_async_variants_agree(bundle: ImageBundle) -> None:
    manager = VmManager(Settings())
    assert await manager.aget_base_image("python") == manager.get_base_image("python")
    assert await manager.aget_kernel() == manager.get_kernel()
    assert (await manager.aget_bundle("python")).rootfs == manager.get_base_image("python")
