"""A minimal bootable guest for the QEMU backend's integration tests.

* kernel: ``$SMARTVM_TEST_KERNEL`` if set, else the project's compiled kernel when
  ``SMARTVM_TEST_KERNEL_PROJECT=1`` (``exec_sandbox.vm_manager``), else Debian's cloud kernel
  (``apt-get download`` + ``dpkg-deb -x``), cached under the user cache dir;
* initramfs: busybox-static + an ``/init`` that prints ``SMARTVM-GUEST-READY`` and then,
  according to ``smartvm.test=<mode>`` on the kernel command line:
  ``counter`` prints ``COUNT <n>`` every 100 ms; ``reboot`` runs ``reboot -f``;
  ``disks`` prints ``DISK <vdX> <sectors>`` per virtio disk; ``serial`` writes ``PORT <name>``
  to every virtio-serial port; ``net`` serves ``hello-from-guest`` over HTTP on 10.0.2.15:80
  (user-mode networking); ``idle`` sleeps forever. (``disks``/``serial``/``net`` need a kernel
  with virtio built in: :func:`project_kernel`.)

Everything is cached by content (package file names + the init script), built atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from platformdirs import user_cache_dir

__all__ = ["READY_MARKER", "guest_initramfs", "guest_kernel", "project_kernel"]

READY_MARKER = "SMARTVM-GUEST-READY"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mode=idle
for arg in $(cat /proc/cmdline); do
  case "$arg" in smartvm.test=*) mode="${{arg#smartvm.test=}}";; esac
done
echo "{READY_MARKER} mode=$mode"
case "$mode" in
  counter)
    i=0
    while true; do echo "COUNT $i"; i=$((i+1)); usleep 100000; done ;;
  reboot)
    echo "REBOOTING"; reboot -f ;;
  disks)
    for d in /sys/block/vd*; do echo "DISK $(basename $d) $(cat $d/size)"; done
    echo "DISKS-DONE"
    while true; do sleep 3600; done ;;
  net)
    # slirp's default network: guest 10.0.2.15/24; serve one page on port 80
    ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
    mkdir -p /www; echo "hello-from-guest" > /www/index.html
    httpd -p 80 -h /www
    echo "NET-UP"
    while true; do sleep 3600; done ;;
  serial)
    for p in /sys/class/virtio-ports/*; do
      name=$(cat $p/name); dev=/dev/$(basename $p)
      echo "PORT $name" > $dev &
    done
    echo "PORTS-WRITTEN"
    while true; do sleep 3600; done ;;
  *)
    while true; do sleep 3600; done ;;
esac
"""

_CACHE = Path(user_cache_dir("smartvm-tests")) / "qemu-guest"


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _download_extract(package: str, work: Path) -> Path:
    """``apt-get download`` ``package`` into ``work`` and extract it; return the extraction root."""
    _run(["apt-get", "download", package], work)
    debs = sorted(work.glob("*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one .deb for {package}, got {debs}")
    root = work / "root"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], work)
    return root


def _candidate(package: str) -> str:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"no apt candidate for {package}")


def _atomic_install(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def guest_kernel() -> Path:
    """A kernel that boots on ``-M microvm,acpi=off`` with a serial console and initramfs."""
    override = os.environ.get("SMARTVM_TEST_KERNEL")
    if override:
        return Path(override)
    project = _project_kernel()
    if project is not None:
        return project
    version = _candidate("linux-image-cloud-amd64")
    key = hashlib.sha256(f"linux-image-cloud-amd64={version}".encode()).hexdigest()[:16]
    dest = _CACHE / f"vmlinuz-cloud-{key}"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        depends = _run(["apt-cache", "depends", "linux-image-cloud-amd64"], work)
        image_pkg = next(
            line.split(":", 1)[1].strip()
            for line in depends.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line
        )
        root = _download_extract(image_pkg, work)
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        return _atomic_install(vmlinuz, dest)


def _project_kernel() -> Path | None:
    """The project's kernel when ``SMARTVM_TEST_KERNEL_PROJECT=1`` (it may compile it: minutes)."""
    if os.environ.get("SMARTVM_TEST_KERNEL_PROJECT") != "1":
        return None
    return project_kernel()


def project_kernel() -> Path:
    """The project's compiled kernel (virtio-mmio, virtio-blk/console built in); builds on first use."""
    from exec_sandbox.settings import Settings
    from exec_sandbox.vm_manager import VmManager

    return VmManager(Settings()).get_kernel()


def _cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor)); symlinks carry their target."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1):
        encoded = name.encode() + b"\x00"
        header = "070701" + "".join(
            f"{value:08X}"
            for value in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        )
        out += header.encode() + encoded
        out += b"\x00" * ((4 - len(out) % 4) % 4)
        out += data
        out += b"\x00" * ((4 - len(out) % 4) % 4)
    return bytes(out)


def guest_initramfs() -> Path:
    """The busybox initramfs described in the module docstring (uncompressed newc cpio)."""
    version = _candidate("busybox-static")
    key = hashlib.sha256(f"busybox-static={version}\nconsole-node\n{INIT_SCRIPT}".encode()).hexdigest()[:16]
    dest = _CACHE / f"initramfs-{key}.cpio"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = _download_extract("busybox-static", work)
        busybox = (root / "bin" / "busybox").read_bytes()
        directory, regular = 0o040755, 0o100755
        none = (0, 0)
        entries = [
            ("bin", directory, b"", none),
            ("dev", directory, b"", none),
            # The kernel opens /dev/console for init before anything can mount devtmpfs.
            ("dev/console", 0o020600, b"", (5, 1)),
            ("proc", directory, b"", none),
            ("sys", directory, b"", none),
            ("bin/busybox", regular, busybox, none),
            ("bin/sh", 0o120777, b"busybox", none),
            ("init", regular, INIT_SCRIPT.encode(), none),
        ]
        archive = work / "initramfs.cpio"
        archive.write_bytes(_cpio_newc(entries))
        return _atomic_install(archive, dest)
