"""Guest images built locally from Debian packages: kernel, per-language rootfs, bundle manifests."""

from __future__ import annotations

from .builder import ImageBuilder, KernelBundle
from .manifest import Artifact, BundleManifest, KernelManifest
from .progress import ProgressCallback, ProgressEvent, ProgressKind
from .recipe import BOOT_ARGS, EXCLUDED_PACKAGES, LANGUAGES

__all__ = [
    "BOOT_ARGS",
    "EXCLUDED_PACKAGES",
    "LANGUAGES",
    "Artifact",
    "BundleManifest",
    "ImageBuilder",
    "KernelBundle",
    "KernelManifest",
    "ProgressCallback",
    "ProgressEvent",
    "ProgressKind",
]
