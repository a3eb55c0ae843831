"""Entry point from the sandbox layer to guest images: ``VmManager(settings).get_base_image(language)``.

Images are built on first use (blocking, progress through the callback, default: logging) and then
served from the cache; the async variants run the same work in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox.images.builder import ImageBuilder
from exec_sandbox.images.manifest import BundleManifest
from exec_sandbox.images.progress import ProgressCallback
from exec_sandbox.images.recipe import LANGUAGES
from exec_sandbox.settings import KernelFlavor, Settings

__all__ = ["ImageBundle", "VmManager"]


@dataclass(frozen=True)
class ImageBundle:
    """Everything needed to boot one language image."""

    language: str
    directory: Path
    kernel: Path
    initrd: Path | None
    rootfs: Path
    manifest: Path
    recipe_hash: str
    kernel_flavor: KernelFlavor
    needs_acpi: bool
    boot_args: str

    @classmethod
    def from_manifest(cls, directory: Path, manifest: BundleManifest) -> ImageBundle:
        return cls(
            language=manifest.language,
            directory=directory,
            kernel=Path(manifest.kernel.path),
            initrd=Path(manifest.initrd.path) if manifest.initrd else None,
            rootfs=Path(manifest.rootfs.path),
            manifest=directory / "manifest.json",
            recipe_hash=manifest.recipe_hash,
            kernel_flavor=manifest.kernel_flavor,
            needs_acpi=manifest.needs_acpi,
            boot_args=manifest.boot_args,
        )


class VmManager:
    """Finds (building when needed) guest kernels and base images."""

    languages: tuple[str, ...] = tuple(LANGUAGES)

    def __init__(self, settings: Settings | None = None, *, progress: ProgressCallback | None = None) -> None:
        self.settings = settings or Settings()
        self._builder = ImageBuilder(self.settings, progress)

    def get_bundle(self, language: str, *, kernel_flavor: KernelFlavor | None = None) -> ImageBundle:
        """The bundle of ``language``; raises SandboxInputError naming the valid languages."""
        manifest = self._builder.ensure_bundle(language, kernel_flavor)
        return ImageBundle.from_manifest(Path(manifest.rootfs.path).parent, manifest)

    def get_base_image(self, language: str) -> Path:
        """The qcow2 base image of ``language`` (never write to it: use an overlay)."""
        return self.get_bundle(language).rootfs

    def get_kernel(self, *, kernel_flavor: KernelFlavor | None = None) -> Path:
        """The kernel image: uncompressed vmlinux (compiled) or vmlinuz (debian-cloud)."""
        return Path(self._builder.ensure_kernel(kernel_flavor).manifest.kernel.path)

    def build_all(
        self,
        languages: Iterable[str] | None = None,
        *,
        kernel_flavor: KernelFlavor | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[ImageBundle]:
        """Build (or verify the cache of) every language image, kernel first."""
        builder = ImageBuilder(self.settings, progress) if progress is not None else self._builder
        builder.ensure_kernel(kernel_flavor)
        bundles = []
        for language in languages or self.languages:
            manifest = builder.ensure_bundle(language, kernel_flavor)
            bundles.append(ImageBundle.from_manifest(Path(manifest.rootfs.path).parent, manifest))
        return bundles

    async def aget_bundle(self, language: str, *, kernel_flavor: KernelFlavor | None = None) -> ImageBundle:
        return await asyncio.to_thread(self.get_bundle, language, kernel_flavor=kernel_flavor)

    async def aget_base_image(self, language: str) -> Path:
        return await asyncio.to_thread(self.get_base_image, language)

    async def aget_kernel(self, *, kernel_flavor: KernelFlavor | None = None) -> Path:
        return await asyncio.to_thread(self.get_kernel, kernel_flavor=kernel_flavor)
