"""Assemble a guest root filesystem from extracted .debs and pack it as ext4 -> qcow2, without mounts.

What ``dpkg-deb -x`` does not do, done here: busybox applet links (shell and coreutils), the
``/sbin/init`` script, users (root + ``user`` uid/gid 1000, also named ``sandbox``; home /home/user
-> /home/sandbox = work dir), the guest agent package under /opt/sbx/sbx_agent, and byte-compiling
Python (``chroot DIR python3 -m compileall``, unchecked-hash pycs, so mtimes do not matter). Docs,
man pages and locales are dropped.
Ownership: run as root, ``dpkg-deb -x`` keeps the packages' root ownership, which
``mkfs.ext4 -d`` copies verbatim; the builder refuses to run as non-root for that reason.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from exec_sandbox.errors import ImageBuildError

from .debian import extract_deb
from .process import run
from .progress import ProgressCallback, StepTimer

__all__ = [
    "FIXED_MTIME",
    "PRUNED_PATHS",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "assemble_rootfs",
    "ext4_options",
    "group_file",
    "pack_qcow2",
    "passwd_file",
]

SANDBOX_UID = 1000
SANDBOX_GID = 1000
FIXED_MTIME = 1_700_000_000  # every file gets this mtime so images depend only on their recipe
PRUNED_PATHS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
)
_DIRS = (
    "proc",
    "sys",
    "dev",
    "tmp",
    "run",
    "root",
    "etc",
    "var/tmp",
    "opt/sbx",
    "home/sandbox",
    "sbin",
    "bin",
)


def passwd_file(user_shell: str = "/bin/sh") -> str:
    """uid 1000 is ``user`` (home ``/home/user``, a link to the work dir ``/home/sandbox``): the name
    E2B's users expect from ``whoami``; ``sandbox`` stays as its second name."""
    return (
        "root:x:0:0:root:/root:/bin/sh\n"
        f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:user:/home/user:{user_shell}\n"
        f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:/home/sandbox:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )


def group_file() -> str:
    return f"root:x:0:\nuser:x:{SANDBOX_GID}:\nsandbox:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"


_ETC: dict[str, Callable[[], str]] = {
    "passwd": passwd_file,
    "group": group_file,
    "hostname": lambda: "sandbox\n",
    "hosts": lambda: "127.0.0.1 localhost sandbox\n",
    "shadow": lambda: "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\nsandbox:*:19000:0:99999:7:::\n",
    # Written at every boot by the guest init and rewritten per clone by the agent (issue 10): the
    # image carries placeholders of the final size, so a rewrite in place never needs a new block.
    "machine-id": lambda: "0" * 32 + "\n",
    "sbx-boot-id": lambda: "00000000-0000-0000-0000-000000000000\n",
}


def assemble_rootfs(
    *, debs: Sequence[Path], staging: Path, guest_dir: Path, progress: ProgressCallback
) -> None:
    """Fill ``staging`` with a bootable root tree."""
    timer = StepTimer(progress, "rootfs: extract packages").start(f"{len(debs)} .debs")
    for deb in debs:
        extract_deb(deb, staging)
    for rel in PRUNED_PATHS:
        shutil.rmtree(staging / rel, ignore_errors=True)
    timer.done()

    timer = StepTimer(progress, "rootfs: configure").start()
    for rel in _DIRS:
        (staging / rel).mkdir(parents=True, exist_ok=True)
    os.chmod(staging / "tmp", 0o1777)
    os.chmod(staging / "var/tmp", 0o1777)
    os.chmod(staging / "root", 0o700)
    for name, content in _ETC.items():
        (staging / "etc" / name).write_text(content())
    if (staging / "bin/bash").exists() or (staging / "usr/bin/bash").exists():
        (staging / "etc/passwd").write_text(passwd_file("/bin/bash"))
    os.chmod(staging / "etc/shadow", 0o640)
    (staging / "home/user").symlink_to("sandbox")

    init = guest_dir / "init"
    target = staging / "sbin/init"
    if target.is_symlink() or target.exists():
        target.unlink()
    shutil.copyfile(init, target)
    os.chmod(target, 0o755)
    for item in sorted(guest_dir.iterdir()):
        if item.name in ("init", "__pycache__") or item.name.startswith("."):
            continue
        dest = staging / "opt/sbx" / item.name
        if item.is_dir():
            shutil.copytree(item, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(item, dest)
    _build_node_addons(staging)
    _busybox_links(staging)
    timer.done()

    timer = StepTimer(progress, "rootfs: compile .pyc").start()
    _compile_python(staging)
    timer.done()

    _finalise_ownership(staging)


def _build_node_addons(staging: Path) -> None:
    """``drivers/reseed.c`` -> ``reseed.node``: the JavaScript driver's in-place reseed after a
    snapshot restore (see the C file). Built with the host's C compiler (the guest is the same
    Debian, x86_64 glibc); without one the guest restarts node instead (slow, still correct)."""
    drivers = staging / "opt/sbx/sbx_agent/drivers"
    source = drivers / "reseed.c"
    cc = shutil.which("cc") or shutil.which("gcc")
    if not source.is_file() or cc is None:
        return
    run([cc, "-shared", "-fPIC", "-O2", "-o", drivers / "reseed.node", source], step="rootfs")


def _busybox_links(staging: Path) -> None:
    busybox = staging / "bin/busybox"
    if not busybox.is_file():
        raise ImageBuildError("busybox-static did not provide /bin/busybox", step="rootfs")
    # busybox-static is a static x86_64 binary: the host can ask it for its applet list.
    applets = run([busybox, "--list-full"], step="rootfs").stdout.split()
    for rel in applets:
        link = staging / rel
        if link.is_symlink() or link.exists():
            continue  # the real tool (or our /sbin/init) wins over the applet
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _compile_python(staging: Path) -> None:
    python = staging / "usr/bin/python3"
    if not (python.is_symlink() or python.exists()):
        raise ImageBuildError("python3 missing from the image", step="compileall")
    targets = [str(p.relative_to(staging)) for p in sorted((staging / "usr/lib").glob("python3*"))]
    targets.append("opt/sbx")
    # -j1: multiprocessing needs /dev/shm, which a mount-free chroot lacks.
    run(
        [
            "chroot",
            staging,
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "-j1",
            "--invalidation-mode",
            "unchecked-hash",
            *(f"/{t}" for t in targets),
        ],
        step="compileall",
        env={"PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": str(FIXED_MTIME)},
    )


def _finalise_ownership(staging: Path) -> None:
    home = staging / "home/sandbox"
    os.chown(home, SANDBOX_UID, SANDBOX_GID)
    os.chmod(home, 0o755)
    os.lchown(staging / "etc/shadow", 0, 42)
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.utime(staging, (FIXED_MTIME, FIXED_MTIME))


def _tree_usage(staging: Path) -> tuple[int, int]:
    """(bytes rounded to 4 KiB blocks, number of inodes) of ``staging``."""
    used, inodes = 0, 1
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            used += (st.st_size + 4095) // 4096 * 4096
            inodes += 1
    return used, inodes


def ext4_options(recipe_hash: str, inodes: int) -> list[str]:
    """mkfs.ext4 flags: UUID and directory-hash seed derived from the recipe (reproducible images);
    no journal (each VM writes to a throwaway overlay, so crash consistency buys nothing)."""
    fs_uuid = uuid.UUID(recipe_hash[:32])
    seed = uuid.UUID(recipe_hash[32:64])
    return [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-m",
        "0",
        "-L",
        "sbx-root",
        "-U",
        str(fs_uuid),
        "-N",
        str(inodes),
        "-O",
        "^has_journal",
        "-E",
        # Inode tables zeroed here (zeros cost nothing in the qcow2), not by the guest kernel's
        # ext4lazyinit thread in the background of every boot, competing with the agent for the CPU.
        f"root_owner=0:0,hash_seed={seed},lazy_itable_init=0",
    ]


#: Free space of the guest filesystem (the work dir lives on it): at least the default
#: ``max_file_bytes`` (256 MiB) plus headroom. Costs nothing: the ext4 has a fixed inode count and
#: no journal, so a bigger one only adds a few bitmaps, and ``qemu-img convert`` stores no zeros.
#: Each VM's overlay only holds what its guest writes. Bigger per VM: ``disk_size_mb``.
WORK_AREA_BYTES = 640 << 20
#: Inodes for the work area at ext4's usual one per 16 KiB (a tree of small files, node_modules,
#: site-packages: 40,960 files). The tables are zeroed at build, and zeros cost nothing in the qcow2.
WORK_AREA_INODES = WORK_AREA_BYTES // (16 << 10)


def pack_qcow2(
    *, staging: Path, recipe_hash: str, out: Path, qemu_img: str, progress: ProgressCallback
) -> int:
    """``mkfs.ext4 -d`` + ``qemu-img convert``; returns the virtual size in bytes."""
    timer = StepTimer(progress, "rootfs: mkfs.ext4 + qcow2").start()
    used, inodes = _tree_usage(staging)
    size = int(used * 1.3) + WORK_AREA_BYTES
    size = (size + (1 << 20) - 1) // (1 << 20) << 20
    raw = out.with_suffix(".ext4")
    with raw.open("wb") as fh:
        fh.truncate(size)
    env = {"E2FSPROGS_FAKE_TIME": str(FIXED_MTIME), "SOURCE_DATE_EPOCH": str(FIXED_MTIME)}
    try:
        run(
            ["mkfs.ext4", *ext4_options(recipe_hash, inodes + inodes // 2 + WORK_AREA_INODES),
             "-d", staging, raw],
            step="mkfs",
            env=env,
        )
        run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", raw, out], step="qcow2")
    finally:
        raw.unlink(missing_ok=True)
    timer.done(f"{size >> 20} MiB")
    return size
