"""Pseudo-terminals for background processes (loaded only when a process asks for one)."""

from __future__ import annotations

import os

from .procs import Proc


def open_pty(rows: int, cols: int, uid: int | None, gid: int | None) -> tuple[int, int]:
    """(master, slave) of a new pty sized ``rows`` x ``cols``; the slave belongs to ``uid``."""
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
