"""The read-only package disk handed to the builder VM: an ext4 image made from a host directory
with ``mkfs.ext4 -d`` (no mount, no root). Its root holds ``tree/``, laid out like the guest's root
(``tree/usr/local/lib/python3.11/dist-packages/...``, ``tree/home/sandbox/node_modules/...``) and
the marker file ``sbx-packages``."""

from __future__ import annotations

import os
from pathlib import Path

from exec_sandbox.errors import PackageResolutionError, SandboxPermanentError
from exec_sandbox.packages.tools import run_package_tool

__all__ = ["MARKER", "MAX_INSTALL_BYTES", "TREE_DIR", "build_mkfs_argv", "disk_size_for", "make_package_disk"]

TREE_DIR = "tree"
MARKER = "sbx-packages"  # the guest's init copies only from a disk that holds this file
#: What one package set may occupy once installed (a layer is copied into every VM's disk view).
MAX_INSTALL_BYTES = 4 << 30
_BLOCK = 4096
_SLACK = 16 << 20


def disk_size_for(total_blocks: int, entries: int) -> int:
    """Bytes of an ext4 image that holds ``total_blocks`` data blocks and ``entries`` inodes. Pure."""
    data = total_blocks * _BLOCK
    inodes = entries * 256  # inode table
    size = int((data + inodes) * 1.25) + _SLACK
    return -(-size // _BLOCK) * _BLOCK


def build_mkfs_argv(mkfs: str, root: Path, image: Path, size_bytes: int, inodes: int) -> list[str]:
    """``mkfs.ext4`` of ``root`` into the file ``image``: no journal (read once, read-only). Pure."""
    return [
        mkfs, "-q", "-F", "-t", "ext4", "-b", str(_BLOCK), "-O", "^has_journal", "-N", str(inodes),
        "-L", "sbx-packages", "-E", "root_owner=0:0", "-d", str(root), str(image), f"{size_bytes // 1024}k",
    ]


def _measure(root: Path) -> tuple[int, int]:
    blocks = entries = 0
    for dirpath, _dirs, filenames in os.walk(root):
        entries += 1 + len(filenames)
        blocks += 1
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            blocks += -(-st.st_size // _BLOCK)
    return blocks, entries


async def make_package_disk(
    root: Path, image: Path, *, mkfs: str = "mkfs.ext4", max_bytes: int = MAX_INSTALL_BYTES,
    packages: str = "",
) -> int:
    """Write the ext4 image of ``root`` (which holds ``tree/``) to ``image``; its size in bytes.
    An install larger than ``max_bytes`` is refused (:class:`PackageResolutionError`)."""
    (root / MARKER).write_bytes(b"")
    blocks, entries = _measure(root)
    if blocks * _BLOCK > max_bytes:
        raise PackageResolutionError(
            f"the packages take {blocks * _BLOCK >> 20} MiB installed, more than {max_bytes >> 20} MiB",
            package=packages, reason="too large",
        )
    size = disk_size_for(blocks, entries)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    result = await run_package_tool(
        build_mkfs_argv(mkfs, root, image, size, entries + 1024), cwd=root.parent, what="mkfs.ext4"
    )
    if result.returncode != 0:
        raise SandboxPermanentError(
            f"mkfs.ext4 could not make the package disk: {result.stderr.strip()[-500:]}",
            context={"field": "packages", "command": mkfs, "stderr": result.stderr[-2000:]},
        )
    return size
