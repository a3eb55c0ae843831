"""The guest disk: grow the root filesystem to its block device (the host may give a VM a bigger
sparse overlay than the image, ``disk_size_mb``)."""

from __future__ import annotations

import os
import sys

EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64): online resize to this many blocks


def grow_root_fs(path: str = "/") -> bool:
    """Grow the ext4 filesystem mounted at ``path`` to the size of its block device, online (the
    guest's PID 1 only; a no-op when it already fills the device). True when the kernel agreed."""
    try:
        st = os.stat(path)
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/size", "rb") as fh:
            device_bytes = int(fh.read()) * 512
        block = os.statvfs(path).f_frsize
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, (device_bytes // block).to_bytes(8, sys.byteorder))
        finally:
            os.close(fd)
        return True
    except (OSError, ValueError):
        return False
