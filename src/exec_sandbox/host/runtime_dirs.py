"""Runtime directories of a Scheduler: private, owner-recorded, and reaped after a dead owner.

A Scheduler's VMs keep their overlays, sockets and VM directories in one runtime dir: the one it was
given, or a fresh ``s<pid>-<hex>`` dir beside smartvm's private runtime dir, made ``0700``, verified
(:func:`smartvm.hostfs.ensure_private_dir`) and carrying an owner record (:mod:`smartvm.leftovers`)
so that the next Scheduler on the host can remove it once its owner is gone.

A VM's overlay ``X`` in a runtime dir carries an owner record ``X.owner.json``, written before the
overlay is made (:func:`record_overlay`); :func:`sweep_stale_overlays` removes what dead owners left.

A runtime dir the caller gives is shared by every Scheduler started on it; a Scheduler starting there
first removes what dead owners left in it (:func:`reap_dead_owners`), e.g. the ``egress-*`` dirs of
the networked sandboxes of a process killed outright.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

from exec_sandbox.errors import SandboxPermanentError
from smartvm.hostfs import UnsafePathError, ensure_private_dir
from smartvm.leftovers import (
    OWNER_FILE,
    SIDECAR_SUFFIX,
    new_owner_record,
    private_runtime_dir,
    reap,
    remove_sidecar_record,
    write_owner_record,
    write_sidecar_record,
)

__all__ = [
    "make_scheduler_runtime_dir",
    "overlay_path",
    "reap_dead_owners",
    "reap_dead_scheduler_dirs",
    "record_overlay",
    "remove_overlay",
    "remove_scheduler_runtime_dir",
    "sweep_stale_overlays",
    "unsafe_dir_error",
]

logger = logging.getLogger(__name__)

_OVERLAY_RECORD_RE = re.compile(r"sbx-\d+-[A-Za-z0-9_.-]+\.qcow2" + re.escape(SIDECAR_SUFFIX))
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


def reap_dead_owners(runtime_dir: Path) -> list[Path]:
    """Remove what dead owners left in a Scheduler's runtime dir (verified private); return it.

    A process killed outright takes its QEMUs with it (parent-death signal), and the connectors of
    its networked sandboxes end with their connections, but its VM dirs, overlays, overlay pool and
    the ``egress-*`` dirs of its egress gateways (Unix sockets + owner record) stay. Each carries an
    owner record (:mod:`smartvm.leftovers`), so the reaper removes exactly those: a live owner's
    (pid + start time) things are kept, and a symlink, an entry or record of another user, or an
    entry without a record (the caller's own files) is never touched.
    """
    return reap(runtime_dir, remove_unrecorded=False).removed


def make_scheduler_runtime_dir(given: Path | None) -> tuple[Path, bool]:
    """``(path, created)``: ``given`` verified (created if missing) and cleared of dead owners'
    leftovers (:func:`reap_dead_owners`), else a fresh private dir with an owner record (``created``
    True: :func:`remove_scheduler_runtime_dir` removes it at close).

    Raises :class:`SandboxPermanentError` when the directory is not safe to use.
    """
    try:
        if given is not None:
            path = ensure_private_dir(given)
            for stale in reap_dead_owners(path):
                logger.warning("removed %s of a process that no longer exists", stale)
            return path, False
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
        raise unsafe_dir_error(exc) from exc


def remove_scheduler_runtime_dir(path: Path) -> None:
    """Remove a dir made by :func:`make_scheduler_runtime_dir` (empty by then) and its owner record."""
    try:
        (path / OWNER_FILE).unlink(missing_ok=True)
        path.rmdir()
    except OSError as exc:
        logger.warning("runtime dir %s not removed: %s", path, exc)


def unsafe_dir_error(exc: UnsafePathError) -> SandboxPermanentError:
    """A runtime directory that failed verification, as our error (raise it ``from exc``)."""
    return SandboxPermanentError(
        f"the runtime directory is not safe to use: {exc.message}",
        context={"path": str(exc.path), "problem": exc.problem},
    )


def overlay_path(runtime_dir: Path, vm_id: str) -> Path:
    return runtime_dir / f"sbx-{os.getpid()}-{vm_id}.qcow2"


def sweep_stale_overlays(runtime_dir: Path) -> list[Path]:
    """Delete overlays left in ``runtime_dir`` by dead owners: each overlay ``X`` has an owner
    record ``X.owner.json`` (:mod:`smartvm.leftovers`), written before the overlay is made."""
    return reap(runtime_dir, name_pattern=_OVERLAY_RECORD_RE, remove_unrecorded=False).removed


def record_overlay(runtime_dir: Path, overlay: Path, vm_id: str) -> None:
    """Before ``overlay`` is made: verify ``runtime_dir``, sweep dead owners' overlays, and write the
    overlay's owner record (an overlay never exists without one; a crash leaves both to the reaper)."""
    try:
        ensure_private_dir(runtime_dir)
    except UnsafePathError as exc:
        raise unsafe_dir_error(exc) from exc
    for stale in sweep_stale_overlays(runtime_dir):
        logger.warning("removed overlay %s of a process that no longer exists", stale)
    write_sidecar_record(overlay, new_owner_record(vm_id, kind="overlay"))


def remove_overlay(overlay: Path) -> None:
    overlay.unlink(missing_ok=True)
    remove_sidecar_record(overlay)
