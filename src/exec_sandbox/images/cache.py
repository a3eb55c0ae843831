"""The image cache on disk: locking, verification and atomic publication of bundle directories.

Layout under ``images_dir``::

    kernel-<flavor>-<hash16>/   vmlinux [initrd.img] config kernel.json
    <language>-<hash16>/        rootfs.qcow2 manifest.json  (kernel referenced by path)
    .locks/<name>.lock          fcntl locks: one builder per bundle across processes
    .resolve/<language>.json    resolved package pins, keyed by the apt lists' fingerprint

A bundle is built in ``.<name>.tmp-<pid>`` beside its final place and renamed into it, so readers
never see a half-built bundle. Verification re-hashes an artifact only when its (size, mtime, ctime,
inode) differ from the stamp written after the last successful hash (``.verified.json``): cheap on
every ``get_base_image`` call, yet any write to an artifact triggers a full sha256 check.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from smartvm.hostfs import atomic_write_file

from .manifest import Artifact, sha256_file

BUNDLE_FILE_MODE = 0o644  # read-only base images: no user data, readable like any installed file

__all__ = ["bundle_lock", "publish", "scratch_dir", "verify_artifacts"]

_STAMP = ".verified.json"


@contextlib.contextmanager
def bundle_lock(
    images_dir: Path, name: str, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Exclusive lock for building ``name``; blocks while another process builds it, calling
    ``on_wait`` first so the user learns why nothing happens."""
    locks = images_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verify_artifacts(bundle_dir: Path, artifacts: Sequence[Artifact]) -> list[str]:
    """Problems found (empty when every artifact exists with its manifest size and sha256)."""
    stamp_path = bundle_dir / _STAMP
    try:
        stamps: dict[str, list[int]] = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamps = {}
    problems: list[str] = []
    fresh: dict[str, list[int]] = {}
    for artifact in artifacts:
        path = Path(artifact.path)
        try:
            key = _stat_key(path)
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if key[0] != artifact.size_bytes:
            problems.append(f"{path}: size {key[0]} != {artifact.size_bytes}")
            continue
        if stamps.get(str(path)) != key and sha256_file(path) != artifact.sha256:
            problems.append(f"{path}: sha256 mismatch")
            continue
        fresh[str(path)] = key
    if not problems and fresh != stamps:
        with contextlib.suppress(OSError):
            # Bundles hold no user data: readable (0644), but written like every host file (mkstemp + rename).
            atomic_write_file(stamp_path, json.dumps(fresh).encode(), mode=BUNDLE_FILE_MODE)
    return problems


def scratch_dir(images_dir: Path, name: str) -> Path:
    """A fresh build directory beside the final one (same filesystem, so the rename is atomic)."""
    path = images_dir / f".{name}.tmp-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(scratch: Path, final: Path) -> None:
    """Move a finished build into place, replacing (and deleting) a stale or corrupt one."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    scratch.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
