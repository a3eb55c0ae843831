"""qcow2 images without the daemon: pure builders (qemu-img argv, blockdev-create options), cached
``qemu-img info``, size and format checks, and overlay creation with ``qemu-img create`` (the fallback
when no storage daemon runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exec_sandbox.errors import QemuStorageDaemonError, SandboxInputError
from smartvm.process import run_tool
from smartvm.qemu.argv import escape_qemu_option_value  # re-exported: one escaper for all QEMU tools

__all__ = [
    "ImageInfo",
    "build_file_create_options",
    "build_qcow2_create_options",
    "build_qemu_img_create_argv",
    "build_qemu_img_info_argv",
    "create_overlay_with_qemu_img",
    "ensure_qcow2",
    "escape_qemu_option_value",
    "get_image_info",
    "overlay_size",
    "parse_image_info",
]

logger = logging.getLogger(__name__)


_INFO_CACHE_SIZE = 64


class ImageInfo(BaseModel):
    """The fields of ``qemu-img info --output=json`` this module relies on."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    format: str
    virtual_size: int = Field(alias="virtual-size", ge=0)
    backing_filename: str | None = Field(default=None, alias="backing-filename")


def build_qemu_img_info_argv(qemu_img: str, image: Path) -> list[str]:
    """``qemu-img info`` of ``image`` without shell or protocol-prefix surprises.

    The ``json:`` pseudo-protocol pins the file driver, so names with ``:`` or ``,``
    are taken literally while the format is still probed. ``-U`` because running
    VMs hold locks on their base image.
    """
    spec = json.dumps({"file": {"driver": "file", "filename": str(image)}})
    return [qemu_img, "info", "-U", "--output=json", f"json:{spec}"]


def build_qemu_img_create_argv(qemu_img: str, base: Path, overlay: Path, size: int) -> list[str]:
    """``qemu-img create`` of a qcow2 overlay over a qcow2 ``base`` (the no-daemon fallback)."""
    return [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay), str(size)]


def parse_image_info(output: str | bytes) -> ImageInfo:
    """Parse ``qemu-img info --output=json``; ``ValueError`` if it is not such output."""
    try:
        return ImageInfo.model_validate_json(output)
    except ValidationError as exc:
        raise ValueError(f"unexpected qemu-img info output: {exc}") from exc


def build_file_create_options(filename: Path) -> dict[str, Any]:
    """blockdev-create options making the empty protocol-level file."""
    return {"driver": "file", "filename": str(filename), "size": 0}


def build_qcow2_create_options(file_node: str, size: int, backing_file: Path) -> dict[str, Any]:
    """blockdev-create options formatting ``file_node`` as a qcow2 over ``backing_file``."""
    return {
        "driver": "qcow2",
        "file": file_node,
        "size": size,
        "backing-file": str(backing_file),
        "backing-fmt": "qcow2",
    }


_InfoKey = tuple[str, int, int, int, int]


_info_cache: dict[_InfoKey, ImageInfo] = {}


# Concurrent callers asking about the same file share one qemu-img run (20 VMs starting at once
# would otherwise fork 20 probes of the same base).
_info_inflight: dict[tuple[asyncio.AbstractEventLoop, _InfoKey], asyncio.Future[ImageInfo]] = {}


async def get_image_info(image: Path, *, qemu_img: str = "qemu-img", timeout: float = 30.0) -> ImageInfo:
    """Format and virtual size of ``image`` (cached while the file's identity is unchanged).

    Raises :class:`QemuStorageDaemonError` ("Failed to get image info ...") when the
    image cannot be opened or probed.
    """
    image = absolute_path(image)
    key = _identity(image)
    loop = asyncio.get_running_loop()
    while True:
        cached = _info_cache.get(key)
        if cached is not None:
            return cached
        shared = _info_inflight.get((loop, key))
        if shared is None:
            break
        try:
            return await asyncio.shield(shared)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not shared.cancelled() or (current is not None and current.cancelling()):
                raise
            # Only the leader was cancelled, not us: probe again.

    shared = loop.create_future()
    _info_inflight[(loop, key)] = shared
    try:
        info = await _probe_image(image, qemu_img=qemu_img, timeout=timeout)
    except Exception as exc:
        shared.set_exception(exc)
        shared.exception()  # retrieved: no "never retrieved" warning when nobody else waited
        raise
    except BaseException:  # cancelled (or the interpreter is going down): waiters probe again
        shared.cancel()
        raise
    else:
        shared.set_result(info)
        if len(_info_cache) >= _INFO_CACHE_SIZE:
            _info_cache.pop(next(iter(_info_cache)))
        _info_cache[key] = info
        return info
    finally:
        del _info_inflight[(loop, key)]


async def _probe_image(image: Path, *, qemu_img: str, timeout: float) -> ImageInfo:
    argv = build_qemu_img_info_argv(qemu_img, image)
    stdout, stderr, returncode = await _run_tool(argv, timeout=timeout, what="qemu-img info")
    if returncode != 0:
        raise QemuStorageDaemonError(
            f"Failed to get image info for {image}: {stderr.strip() or f'exit code {returncode}'}",
            context={"image": str(image), "command": argv, "exit_code": returncode, "stderr": stderr},
        )
    try:
        return parse_image_info(stdout)
    except ValueError as exc:
        raise QemuStorageDaemonError(
            f"Failed to get image info for {image}: {exc}", context={"image": str(image), "command": argv}
        ) from exc


async def _run_tool(argv: list[str], *, timeout: float, what: str) -> tuple[str, str, int]:
    """Run a short-lived tool; killed (and reaped) on timeout or cancellation."""
    try:
        result = await run_tool(argv, timeout=timeout)
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        raise QemuStorageDaemonError(f"{what} timed out after {timeout}s", context={"command": argv}) from exc
    except OSError as exc:
        raise QemuStorageDaemonError(
            f"Cannot run {what} ({argv[0]}): {exc}", context={"command": argv}
        ) from exc
    return result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"), result.returncode


def absolute_path(path: Path) -> Path:
    """Absolute without resolving symlinks: a backing file must name the path the caller gave."""
    return Path(path).absolute()


def _identity(image: Path) -> tuple[str, int, int, int, int]:
    try:
        st = image.stat()
    except OSError as exc:
        raise QemuStorageDaemonError(
            f"Failed to get image info for {image}: {exc.strerror or exc}", context={"image": str(image)}
        ) from exc
    return (str(image), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def refuse_existing(overlay: Path) -> None:
    if overlay.exists() or overlay.is_symlink():
        raise SandboxInputError(f"Overlay target {overlay} already exists", context={"overlay": str(overlay)})


def remove_partial(overlay: Path) -> None:
    try:
        overlay.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        logger.warning("could not remove partial overlay %s: %s", overlay, exc)


def ensure_qcow2(image: Path, info: ImageInfo) -> None:
    """Overlays are always qcow2-over-qcow2; anything else is refused by name."""
    if info.format != "qcow2":
        raise QemuStorageDaemonError(
            f"Base image {image} is not qcow2 format (detected {info.format!r})",
            context={"image": str(image), "format": info.format},
        )


def overlay_size(image: Path, info: ImageInfo, size: int | None) -> int:
    """The overlay's virtual size: the base's unless a larger one is asked for."""
    if size is None:
        return info.virtual_size
    if size < info.virtual_size:
        raise SandboxInputError(
            f"Overlay size {size} is smaller than the virtual size {info.virtual_size} of base {image}",
            context={"size": size, "base_virtual_size": info.virtual_size},
        )
    return size


async def create_overlay_with_qemu_img(
    base: Path,
    overlay: Path,
    *,
    size: int | None = None,
    qemu_img: str = "qemu-img",
    timeout: float = 30.0,
) -> None:
    """Same contract as :meth:`QemuStorageDaemon.create_overlay`, one ``qemu-img`` process per call."""
    base, overlay = absolute_path(base), absolute_path(overlay)
    info = await get_image_info(base, qemu_img=qemu_img, timeout=timeout)
    ensure_qcow2(base, info)
    argv = build_qemu_img_create_argv(qemu_img, base, overlay, overlay_size(base, info, size))
    refuse_existing(overlay)
    try:
        _, stderr, returncode = await _run_tool(argv, timeout=timeout, what="qemu-img create")
    except BaseException:
        remove_partial(overlay)
        raise
    if returncode != 0:
        remove_partial(overlay)
        raise QemuStorageDaemonError(
            f"qemu-img create failed for {overlay}: {stderr.strip() or f'exit code {returncode}'}",
            context={"command": argv, "exit_code": returncode, "stderr": stderr},
        )
