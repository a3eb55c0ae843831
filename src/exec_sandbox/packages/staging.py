"""From a request to a package disk: resolve (or take the given lock), install into a host tree,
pack it as a read-only ext4 image. Host side only; the builder VM that turns the disk into an L2
layer is :mod:`exec_sandbox.vm.layer_build`.

Why install on the host and only copy in the guest: pip and npm need the network and the user's
configuration, both of which stay on the host; the guest gets files, never a network or a
credential. Nothing the packages ship is executed on the host (wheels only, ``--ignore-scripts``).
"""

from __future__ import annotations

from pathlib import Path

from exec_sandbox.packages import npm, pip
from exec_sandbox.packages.disk import TREE_DIR, make_package_disk
from exec_sandbox.packages.lock import GuestTarget, PackageLock, ProgressCallback
from exec_sandbox.packages.request import PackageRequest
from exec_sandbox.packages.tools import retry_fetch

__all__ = ["DISK_FILE", "lock_for", "stage_disk"]

DISK_FILE = "packages.ext4"


def _noop(step: str, kind: str, detail: str) -> None:
    return None


async def lock_for(
    request: PackageRequest,
    target: GuestTarget,
    workdir: Path,
    *,
    progress: ProgressCallback | None = None,
    attempts: int = 3,
) -> PackageLock:
    """The exact lock of ``request`` for ``target`` (resolved with the host's tools, or the given
    lock checked against the target). Host network failures are retried ``attempts`` times."""
    report = progress or _noop
    label = target.label(request.ecosystem)
    if request.lock is not None:
        lock = request.lock
        if not lock.target:  # pins given as strings: valid for any guest
            lock = lock.model_copy(update={"target": label})
        lock.require_target(label)
        return lock
    report("resolving packages", "start", ", ".join(request.specs))
    if request.ecosystem == "pip":
        lock = await retry_fetch(lambda: pip.resolve(request.specs, target, workdir), attempts=attempts)
    else:
        lock = await retry_fetch(
            lambda: npm.resolve(request.specs, target, _fresh(workdir)), attempts=attempts
        )
    pinned = [f"{name} {version}" for name, version in lock.versions().items()]
    report("resolving packages", "done", ", ".join(pinned[:6]) + (", …" if len(pinned) > 6 else ""))
    return lock


def _fresh(workdir: Path) -> Path:
    """A new empty subdirectory per attempt (npm leaves files behind on failure)."""
    n = 0
    while (workdir / f"attempt-{n}").exists():
        n += 1
    path = workdir / f"attempt-{n}"
    path.mkdir(mode=0o700)
    return path


async def stage_disk(
    lock: PackageLock,
    target: GuestTarget,
    workdir: Path,
    *,
    progress: ProgressCallback | None = None,
    attempts: int = 3,
) -> Path:
    """Download (hash-checked) and install ``lock`` into a tree under ``workdir``; pack it into
    ``workdir/packages.ext4`` and return that image."""
    report = progress or _noop
    report("downloading packages", "start", f"{len(lock.packages)} files")
    root = workdir / "disk"
    root.mkdir(mode=0o755)

    async def install() -> Path:
        attempt = _fresh(workdir)
        tree = attempt / TREE_DIR
        if lock.ecosystem == "pip":
            await pip.install_lock(lock, target, attempt, tree)
        else:
            await npm.install_lock(lock, attempt, tree)
        return tree

    tree = await retry_fetch(install, attempts=attempts)
    tree.rename(root / TREE_DIR)
    report("downloading packages", "done", f"{len(lock.packages)} files")
    image = workdir / DISK_FILE
    await make_package_disk(root, image, packages=", ".join(lock.versions()))
    return image
