"""Runtime directories of a Scheduler: private, owner-recorded, and reaped after a dead owner.

A Scheduler's VMs keep their overlays, sockets and VM directories in one runtime dir: the one it was
given, or a fresh ``s<pid>-<hex>`` dir beside smartvm's private runtime dir, made ``0700``, verified
(:func:`smartvm.hostfs.ensure_private_dir`) and carrying an owner record (:mod:`smartvm.leftovers`)
so that the next Scheduler on the host can remove it once its owner is gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

from exec_sandbox.errors import SandboxPermanentError
from smartvm.hostfs import UnsafePathError, ensure_private_dir
from smartvm.leftovers import OWNER_FILE, new_owner_record, private_runtime_dir, reap, write_owner_record

__all__ = ["make_scheduler_runtime_dir", "reap_dead_scheduler_dirs", "remove_scheduler_runtime_dir"]

logger = logging.getLogger(__name__)

_SCHEDULER_DIR = re.compile(r"s(\d+)-[0-9a-f]{4}")


def reap_dead_scheduler_dirs(base: Path) -> list[Path]:
    """Remove the runtime dirs (``s<pid>-<hex>``) of Schedulers whose process is gone; return them.

    A Scheduler killed outright (SIGKILL, the OOM killer) takes its QEMUs and storage daemon with
    it (parent-death signal), but nothing of it removes its overlays, its VM directories or the
    guest-RAM files in /dev/shm (tmpfs: RAM that stays used). The next Scheduler on this host
    does, through smartvm's reaper (:mod:`smartvm.leftovers`): a Scheduler dir carries an owner
    record (pid + start time), so a live or reused pid keeps its dir; a dir without a record, not
    ours, or a symlink is never touched (``base`` may be a shared directory such as ``/tmp``).
    """
    return reap(base, name_pattern=_SCHEDULER_DIR, remove_unrecorded=False, shared_base=True).removed


def make_scheduler_runtime_dir(given: Path | None) -> tuple[Path, bool]:
    """``(path, created)``: ``given`` verified (created if missing), else a fresh private dir with an
    owner record (``created`` True: :func:`remove_scheduler_runtime_dir` removes it at close).

    Raises :class:`SandboxPermanentError` when the directory is not safe to use.
    """
    try:
        if given is not None:
            return ensure_private_dir(given), False
        # Per scheduler, short (QEMU socket paths must stay under 108 bytes).
        base = private_runtime_dir().parent
        reap_dead_scheduler_dirs(base)
        for attempt in range(16):  # a name taken (planted, if base is shared) is skipped, never used
            path = base / f"s{os.getpid()}-{secrets.token_hex(2)}"
            try:
                path.mkdir(mode=0o700)
                break
            except FileExistsError:
                if attempt == 15:
                    raise
        ensure_private_dir(path, create=False)
        write_owner_record(path, new_owner_record(path.name, kind="scheduler"))
        return path, True
    except UnsafePathError as exc:
        raise SandboxPermanentError(
            f"the runtime directory is not safe to use: {exc.message}",
            context={"path": str(exc.path), "problem": exc.problem},
        ) from exc


def remove_scheduler_runtime_dir(path: Path) -> None:
    """Remove a dir made by :func:`make_scheduler_runtime_dir` (empty by then) and its owner record."""
    try:
        (path / OWNER_FILE).unlink(missing_ok=True)
        path.rmdir()
    except OSError as exc:
        logger.warning("runtime dir %s not removed: %s", path, exc)
