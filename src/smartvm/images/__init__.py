"""Base-image bundles (fetch, verify, cache) and per-VM rootfs copies."""

from smartvm.images.base_images import DEFAULT_LTS_BASE_URL, BaseImageManager, default_cache_dir
from smartvm.images.image_manager import ImageManager
from smartvm.images.manifest import (
    ArtifactSpec,
    BaseImageBundle,
    BundleChecksums,
    FirecrackerCISource,
    HostedManifest,
    HostedManifestSource,
    ProgressEvent,
    parse_hosted_manifest,
)

__all__ = [
    "DEFAULT_LTS_BASE_URL",
    "ArtifactSpec",
    "BaseImageBundle",
    "BaseImageManager",
    "BundleChecksums",
    "FirecrackerCISource",
    "HostedManifest",
    "HostedManifestSource",
    "ImageManager",
    "ProgressEvent",
    "default_cache_dir",
    "parse_hosted_manifest",
]
