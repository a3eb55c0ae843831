"""Pseudo-terminals for background processes (loaded only when a process asks for one)."""

from __future__ import annotations

import os

from .procs import Proc

MS_NOSUID = 2
MS_NOEXEC = 8


def _mount_devpts() -> None:
    """Mount /dev/pts (the guest's PID 1 only): the boot does not, the first terminal does - a
    mount at every boot would cost its fork under TCG for a feature few sandboxes use."""
    import ctypes

    os.makedirs("/dev/pts", mode=0o755, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC,
                  b"mode=0620,ptmxmode=0666") != 0:
        errno_ = ctypes.get_errno()
        raise OSError(errno_, f"mounting /dev/pts: {os.strerror(errno_)}")


def open_pty(rows: int, cols: int, uid: int | None, gid: int | None) -> tuple[int, int]:
    """(master, slave) of a new pty sized ``rows`` x ``cols``; the slave belongs to ``uid``."""
    try:
        master, slave = os.openpty()
    except OSError:
        if os.getpid() != 1 or os.path.ismount("/dev/pts"):
            raise
        _mount_devpts()
        master, slave = os.openpty()
    try:
        set_size(master, rows, cols)
        if uid is not None:
            # The user's own terminal: programs re-open it (/dev/tty) and check its owner.
            os.fchown(slave, uid, gid if gid is not None else -1)
            os.fchmod(slave, 0o620)
        os.set_inheritable(slave, False)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def set_size(master: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:  # pragma: no cover - runs in the forked child
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def start_pty_process(argv: list[str], *, slave: int, cwd: str, env: dict[str, str], uid: int | None,
                      gid: int | None) -> Proc:
    """``argv`` in a new session whose controlling terminal is ``slave`` (also its stdio).

    Popen with a ``preexec_fn`` that takes the terminal (TIOCSCTTY): the one step fork_exec has no
    flag for. subprocess is imported here only, off the boot path; PTY processes are rare.
    """
    import fcntl  # noqa: F401  # imported before the fork: the child must not import anything
    import subprocess
    import termios  # noqa: F401

    extra: dict[str, object] = {}
    if uid is not None:
        extra = {"user": uid, "group": gid, "extra_groups": []}
    popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                             start_new_session=True, close_fds=True, preexec_fn=_take_terminal,
                             umask=0o022, **extra)  # type: ignore[call-overload]
    return Proc(popen.pid, None, None, popen)
