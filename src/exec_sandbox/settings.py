"""Runtime settings for :mod:`exec_sandbox`, read from ``EXEC_SANDBOX_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["KernelFlavor", "Settings"]

KernelFlavor = Literal["compiled", "debian-cloud"]


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("exec-sandbox"))


class Settings(BaseSettings):
    """Where images live, which QEMU tools to run and how images are built.

    ``images_dir`` defaults to ``cache_dir / "images"`` (also when only ``cache_dir`` is overridden).
    """

    model_config = SettingsConfigDict(env_prefix="EXEC_SANDBOX_", extra="ignore", validate_default=True)

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    images_dir: Path = Path("images")
    force_emulation: bool = False
    kernel_flavor: KernelFlavor = "compiled"
    qemu_system_binary: str = "qemu-system-x86_64"
    qemu_img_binary: str = "qemu-img"
    qemu_storage_daemon_binary: str = "qemu-storage-daemon"
    build_jobs: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    linux_source_tarball: Path = Path("/usr/src/linux-source-6.1.tar.xz")

    @model_validator(mode="before")
    @classmethod
    def _images_dir_under_cache_dir(cls, data: Any) -> Any:
        # A before-validator sees the merged init kwargs + environment, so an explicit images_dir
        # (from either) wins and otherwise it follows whatever cache_dir ended up being.
        if isinstance(data, dict) and data.get("images_dir") in (None, ""):
            cache_dir = data.get("cache_dir") or _default_cache_dir()
            data = {**data, "images_dir": Path(cache_dir) / "images"}
        return data
