"""ImageManager: one writable rootfs copy per VM.

A VM must never write to the cached base rootfs, so each VM gets its own copy at
``<data_dir>/vm-rootfs/<vm_id>/rootfs<suffix>``. The copy is made with
``cp --reflink=auto`` (a copy-on-write clone on btrfs/XFS, a hole-preserving
copy elsewhere) into a temp file that is renamed into place, so a half-written
copy is never visible. Cancellation kills ``cp`` and removes the temp file.
Failures raise ``IMAGE_COPY_FAILED``; a bad ``vm_id`` raises ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.download import temp_path_for
from smartvm.process import run_tool

__all__ = ["ImageManager"]

_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_STDERR_TAIL = 2000


class ImageManager:
    """Per-VM writable rootfs copies under ``data_dir``."""

    def __init__(self, data_dir: Path | str) -> None:
        self._data_dir = Path(data_dir).expanduser()
        self._root = self._data_dir / "vm-rootfs"
        self._prepared: dict[str, Path] = {}

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def rootfs_path(self, vm_id: str) -> Path | None:
        """The copy prepared for ``vm_id`` by this manager, if any."""
        return self._prepared.get(vm_id)

    def list(self) -> list[str]:
        return sorted(self._prepared)

    def _vm_dir(self, vm_id: str) -> Path:
        if not isinstance(vm_id, str) or not _VM_ID_RE.fullmatch(vm_id):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"vm_id {vm_id!r} must match [A-Za-z0-9][A-Za-z0-9_-]* (max 64 chars)",
                details={"vm_id": str(vm_id)},
            )
        return self._root / vm_id

    async def prepare_rootfs(self, vm_id: str, base_rootfs: Path | str) -> Path:
        """Copy ``base_rootfs`` to a fresh writable file for ``vm_id`` and return its path.

        Preparing the same ``vm_id`` again replaces its copy with a fresh one.
        """
        vm_dir = self._vm_dir(vm_id)
        source, dest, temp = await asyncio.to_thread(_prepare_paths, vm_id, vm_dir, base_rootfs)
        try:
            await self._copy(source, temp, vm_id)
            os.replace(temp, dest)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.IMAGE_COPY_FAILED,
                f"cannot place rootfs copy at {dest}: {exc.strerror or exc}",
                details={"vm_id": vm_id, "path": str(dest)},
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            if vm_id not in self._prepared and not dest.exists():
                with contextlib.suppress(OSError):
                    vm_dir.rmdir()  # only if empty: nothing left behind by a failed first copy
        self._prepared[vm_id] = dest
        return dest

    @staticmethod
    async def _copy(source: Path, temp: Path, vm_id: str) -> None:
        argv = ["cp", "--reflink=auto", "--", str(source), str(temp)]
        try:
            # run_tool kills and reaps cp on cancellation: none may keep writing the temp file.
            result = await run_tool(argv)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.IMAGE_COPY_FAILED,
                f"cannot run cp: {exc.strerror or exc}",
                details={"vm_id": vm_id, "command": " ".join(argv)},
            ) from exc
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace")[-_STDERR_TAIL:].strip()
            raise SmartVMError(
                ErrorCode.IMAGE_COPY_FAILED,
                f"copying {source} failed (cp exit {result.returncode}): {tail}",
                details={"vm_id": vm_id, "command": " ".join(argv), "exit_code": result.returncode,
                         "stderr": tail},
            )

    async def remove(self, vm_id: str) -> None:
        """Delete ``vm_id``'s copy; a no-op if there is none."""
        vm_dir = self._vm_dir(vm_id)
        self._prepared.pop(vm_id, None)
        await asyncio.to_thread(_rmtree, vm_dir)

    async def cleanup(self) -> None:
        """Delete every copy this manager prepared (other managers' copies are left alone)."""
        for vm_id in list(self._prepared):
            await self.remove(vm_id)


def _prepare_paths(vm_id: str, vm_dir: Path, base_rootfs: Path | str) -> tuple[Path, Path, Path]:
    source = Path(base_rootfs).expanduser()
    if not source.is_file():
        raise SmartVMError(
            ErrorCode.IMAGE_COPY_FAILED,
            f"base rootfs {source} does not exist or is not a regular file",
            details={"vm_id": vm_id, "source": str(source)},
        )
    try:
        vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.IMAGE_COPY_FAILED,
            f"cannot create {vm_dir}: {exc.strerror or exc}",
            details={"vm_id": vm_id, "path": str(vm_dir)},
        ) from exc
    dest = vm_dir / f"rootfs{''.join(source.suffixes[-1:])}"
    temp = temp_path_for(dest)
    return source, dest, temp


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.IMAGE_COPY_FAILED,
            f"cannot remove {path}: {exc.strerror or exc}",
            details={"path": str(path)},
        ) from exc
