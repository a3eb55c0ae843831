"""The no-compile fallback: Debian's prebuilt cloud kernel plus a tiny initramfs.

Its virtio drivers are modules and ``virtio_mmio.device=`` cannot reach a module before it is
loaded, so the VM must run with ACPI on (microvm then describes its virtio-mmio devices in ACPI
tables) and the initramfs loads the modules, mounts /dev/vda and switch_roots into the image's own
/sbin/init. Module dependencies are read from each module's ``.modinfo`` (the .deb ships no
modules.dep: Debian generates it in postinst), so no host kmod tools are needed.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from exec_sandbox.errors import ImageBuildError

from .debian import extract_deb
from .process import run
from .progress import ProgressCallback, StepTimer

__all__ = [
    "BOOT_ARGS",
    "EXCLUDED",
    "MODULES",
    "ROOTS",
    "build_cloud_kernel",
    "initramfs_init",
    "initramfs_init_digest",
    "module_load_order",
]

ROOTS = ("linux-image-cloud-amd64", "busybox-static")
# The kernel package's own Depends are install-time tools (kmod, initramfs generators) we replace.
EXCLUDED = frozenset(
    {
        "kmod",
        "linux-base",
        "initramfs-tools",
        "dracut",
        "tiny-initramfs",
        "linux-initramfs-tool",
        "initramfs-tools-core",
    }
)
MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng", "virtio_net", "ext4")
BOOT_ARGS = "console=ttyS0 quiet reboot=t panic=-1 tsc_early_khz=2600000 lpj=10400000 no_timer_check rw"


def initramfs_init() -> str:
    return """#!/bin/busybox sh
# exec_sandbox initramfs for Debian's cloud kernel: load virtio modules, mount /dev/vda, switch_root.
B=/bin/busybox
$B mkdir -p /dev /proc /newroot
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.order); do $B insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do $B usleep 10000; i=$((i+1)); done
$B mount -t ext4 -o rw /dev/vda /newroot || { echo "sbx: cannot mount /dev/vda"; $B reboot -f; }
$B mount --move /dev /newroot/dev
# Honour init= like a kernel without initramfs would; our own argv (after "--") goes along.
$B mount -t proc proc /proc
INIT=/sbin/init
for a in $($B cat /proc/cmdline); do case $a in init=*) INIT=${a#init=};; esac; done
$B umount /proc
exec $B switch_root /newroot "$INIT" "$@"
"""


def initramfs_init_digest() -> str:
    return hashlib.sha256(initramfs_init().encode()).hexdigest()


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def _modinfo_depends(data: bytes) -> list[str]:
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)", data)
    if not match or not match[1]:
        return []
    return [d.decode().replace("-", "_") for d in match[1].split(b",") if d]


def module_load_order(wanted: Sequence[str], index: dict[str, Path]) -> list[str]:
    """Dependencies first; ``index`` maps module name (underscored) -> .ko file."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ImageBuildError(f"module dependency cycle at {name}", step="initramfs")
        if name not in index:
            raise ImageBuildError(f"kernel module {name} not found in the cloud kernel", step="initramfs")
        visiting.add(name)
        for dep in _modinfo_depends(_read_module(index[name])):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def _builtin(config: str, module: str) -> bool:
    symbols = {
        "virtio_mmio": "VIRTIO_MMIO",
        "virtio_blk": "VIRTIO_BLK",
        "virtio_console": "VIRTIO_CONSOLE",
        "virtio_rng": "HW_RANDOM_VIRTIO",
        "virtio_net": "VIRTIO_NET",
        "ext4": "EXT4_FS",
    }
    symbol = symbols.get(module)
    return symbol is not None and f"CONFIG_{symbol}=y" in config


def build_cloud_kernel(
    *, debs: Sequence[Path], workdir: Path, out_dir: Path, progress: ProgressCallback
) -> tuple[Path, Path]:
    """Extract the kernel, build ``initrd.img``; returns (vmlinuz, initrd) inside ``out_dir``."""
    timer = StepTimer(progress, "kernel: extract cloud kernel").start()
    tree = workdir / "tree"
    tree.mkdir()
    for deb in debs:
        extract_deb(deb, tree)
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise ImageBuildError(
            f"expected one vmlinuz in the cloud kernel, found {images}", step="kernel-extract"
        )
    version = images[0].name.removeprefix("vmlinuz-")
    config_files = list((tree / "boot").glob("config-*"))
    config = config_files[0].read_text() if config_files else ""
    timer.done(version)

    timer = StepTimer(progress, "kernel: initramfs").start()
    index = {
        re.sub(r"\.ko(\.xz)?$", "", p.name).replace("-", "_"): p
        for p in (tree / "lib/modules" / version).rglob("*.ko*")
    }
    order = module_load_order([m for m in MODULES if not _builtin(config, m)], index)
    root = workdir / "initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "lib/modules").mkdir(parents=True)
    shutil.copyfile(tree / "bin/busybox", root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for name in order:
        (root / "lib/modules" / f"{name}.ko").write_bytes(_read_module(index[name]))
    (root / "modules.order").write_text("\n".join(order) + "\n")
    (root / "init").write_text(initramfs_init())
    os.chmod(root / "init", 0o755)
    out_dir.mkdir(parents=True, exist_ok=True)
    initrd = out_dir / "initrd.img"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    proc = run(
        ["sh", "-c", f'cpio --quiet -o -H newc --reproducible > "{initrd}"'],
        step="initramfs",
        cwd=root,
        check=False,
        input_text="\n".join(files) + "\n",
    )
    if proc.returncode != 0:
        raise ImageBuildError(f"cpio failed: {proc.stderr[-300:]}", step="initramfs", stderr=proc.stderr)
    vmlinuz = out_dir / "vmlinuz"
    shutil.copyfile(images[0], vmlinuz)
    timer.done(", ".join(order))
    return vmlinuz, initrd
