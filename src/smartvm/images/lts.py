"""Pure helpers for the ``lts`` preset: Firecracker's CI artifact bucket.

The bucket (``https://s3.amazonaws.com/spec.ccfc.min`` by default) is listed with
S3's ListObjectsV2 API (``GET {base}/?list-type=2&prefix=...``), paged through
``continuation-token``. Artifacts of one CI line live under
``firecracker-ci/<vX.Y>/<arch>/``.

Selection rules (decided here, documented for users):

* kernel: the newest ``vmlinux-X.Y.Z`` by numeric version; variants with any
  suffix (``vmlinux-6.1.141.config``, ``-no-acpi``...) are ignored;
* rootfs: the newest ``ubuntu-X.Y.ext4`` if the line publishes one, because an
  ext4 image can be used directly as a writable root drive; otherwise the newest
  ``ubuntu-X.Y.squashfs``, recorded as ``rootfs_type="squashfs"`` and read-only
  (turning it into a writable ext4 needs ``unsquashfs``, outside this layer);
* when no ``ci_version`` is given, the newest ``vX.Y`` prefix directly under
  ``firecracker-ci/`` (listed with ``delimiter=/``).

No I/O happens here; :mod:`smartvm.images.base_images` fetches the pages.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from smartvm.errors import ErrorCode, SmartVMError

__all__ = [
    "CI_ROOT_PREFIX",
    "ListingPage",
    "LtsSelection",
    "S3Object",
    "artifact_url",
    "ci_prefix",
    "listing_url",
    "lts_bundle_id",
    "parse_ci_version",
    "parse_listing",
    "select_artifacts",
    "select_ci_version",
]

CI_ROOT_PREFIX = "firecracker-ci/"
_CI_VERSION_RE = re.compile(r"^v(\d+)\.(\d+)$")
_KERNEL_RE = re.compile(r"^vmlinux-(\d+)\.(\d+)\.(\d+)$")
_ROOTFS_RE = re.compile(r"^ubuntu-(\d+)\.(\d+)\.(ext4|squashfs)$")
_MD5_ETAG_RE = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int | None = None
    etag: str | None = None

    @property
    def md5(self) -> str | None:
        """The content MD5, when the ETag is one (multipart uploads have ``<md5>-<parts>`` instead)."""
        if self.etag is None:
            return None
        match = _MD5_ETAG_RE.fullmatch(self.etag.strip())
        return match.group(1).lower() if match else None


@dataclass(frozen=True)
class ListingPage:
    objects: list[S3Object] = field(default_factory=list)
    common_prefixes: list[str] = field(default_factory=list)
    is_truncated: bool = False
    next_continuation_token: str | None = None


@dataclass(frozen=True)
class LtsSelection:
    ci_version: str
    arch: str
    kernel: S3Object
    kernel_version: str
    rootfs: S3Object
    rootfs_type: str  # "ext4" | "squashfs"
    rootfs_name: str  # e.g. "ubuntu-24.04"


def parse_ci_version(value: str) -> tuple[int, int]:
    match = _CI_VERSION_RE.fullmatch(value)
    if not match:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"ci_version {value!r} must look like 'v1.16' (v<major>.<minor>)",
            details={"ci_version": value},
        )
    return int(match.group(1)), int(match.group(2))


def ci_prefix(ci_version: str, arch: str) -> str:
    return f"{CI_ROOT_PREFIX}{ci_version}/{arch}/"


def listing_url(base_url: str, prefix: str, *, continuation_token: str | None = None,
                delimiter: str | None = None) -> str:
    params = [("list-type", "2"), ("prefix", prefix)]
    if delimiter is not None:
        params.append(("delimiter", delimiter))
    if continuation_token is not None:
        params.append(("continuation-token", continuation_token))
    return f"{base_url.rstrip('/')}/?{urlencode(params)}"


def artifact_url(base_url: str, key: str) -> str:
    return f"{base_url.rstrip('/')}/{quote(key, safe='/')}"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def parse_listing(raw: bytes | str, *, origin: str) -> ListingPage:
    """Parse one ListObjectsV2 response page (namespace-agnostic)."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
            f"bucket listing {origin} is not valid XML: {exc}",
            details={"origin": origin},
        ) from exc
    if _local(root.tag) != "ListBucketResult":
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
            f"bucket listing {origin} is not a ListBucketResult (root element {_local(root.tag)!r})",
            details={"origin": origin},
        )
    objects: list[S3Object] = []
    prefixes: list[str] = []
    for child in root:
        name = _local(child.tag)
        if name == "Contents":
            key = _child_text(child, "Key")
            if not key:
                continue
            size_text = _child_text(child, "Size")
            try:
                size = int(size_text) if size_text is not None else None
            except ValueError:
                size = None
            objects.append(S3Object(key=key, size=size, etag=_child_text(child, "ETag")))
        elif name == "CommonPrefixes":
            prefix = _child_text(child, "Prefix")
            if prefix:
                prefixes.append(prefix)
    truncated = (_child_text(root, "IsTruncated") or "").strip().lower() == "true"
    token = _child_text(root, "NextContinuationToken")
    if truncated and not token:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
            f"bucket listing {origin} is truncated but carries no NextContinuationToken",
            details={"origin": origin},
        )
    return ListingPage(objects=objects, common_prefixes=prefixes, is_truncated=truncated,
                       next_continuation_token=token if truncated else None)


def select_ci_version(common_prefixes: list[str]) -> str:
    """Newest ``vX.Y`` among ``firecracker-ci/vX.Y/`` prefixes."""
    best: tuple[tuple[int, int], str] | None = None
    for prefix in common_prefixes:
        if not prefix.startswith(CI_ROOT_PREFIX):
            continue
        name = prefix[len(CI_ROOT_PREFIX):].rstrip("/")
        match = _CI_VERSION_RE.fullmatch(name)
        if match:
            version = (int(match.group(1)), int(match.group(2)))
            if best is None or version > best[0]:
                best = (version, name)
    if best is None:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_NOT_FOUND,
            f"no CI version (vX.Y) found under {CI_ROOT_PREFIX}",
            details={"prefixes": ", ".join(common_prefixes[:20])},
        )
    return best[1]


def select_artifacts(objects: list[S3Object], *, ci_version: str, arch: str) -> LtsSelection:
    """Pick the kernel and rootfs for one CI line from a full listing of its prefix."""
    prefix = ci_prefix(ci_version, arch)
    kernel: tuple[tuple[int, int, int], S3Object] | None = None
    ext4: tuple[tuple[int, int], S3Object] | None = None
    squashfs: tuple[tuple[int, int], S3Object] | None = None
    for obj in objects:
        if not obj.key.startswith(prefix):
            continue
        name = obj.key[len(prefix):]
        if match := _KERNEL_RE.fullmatch(name):
            kv = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
            if kernel is None or kv > kernel[0]:
                kernel = (kv, obj)
        elif match := _ROOTFS_RE.fullmatch(name):
            rv = (int(match.group(1)), int(match.group(2)))
            if match.group(3) == "ext4":
                if ext4 is None or rv > ext4[0]:
                    ext4 = (rv, obj)
            elif squashfs is None or rv > squashfs[0]:
                squashfs = (rv, obj)
    if kernel is None:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_NOT_FOUND,
            f"no vmlinux-X.Y.Z kernel found under {prefix}",
            details={"prefix": prefix},
        )
    chosen = ext4 or squashfs
    if chosen is None:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_NOT_FOUND,
            f"no ubuntu-X.Y.ext4 or ubuntu-X.Y.squashfs rootfs found under {prefix}",
            details={"prefix": prefix},
        )
    rootfs_obj = chosen[1]
    rootfs_file = rootfs_obj.key[len(prefix):]
    rootfs_name, rootfs_type = rootfs_file.rsplit(".", 1)
    return LtsSelection(
        ci_version=ci_version,
        arch=arch,
        kernel=kernel[1],
        kernel_version=".".join(str(p) for p in kernel[0]),
        rootfs=rootfs_obj,
        rootfs_type=rootfs_type,
        rootfs_name=rootfs_name,
    )


def lts_bundle_id(selection: LtsSelection) -> str:
    """Deterministic, filesystem-safe id: a new kernel or rootfs upstream means a new bundle."""
    return (
        f"lts-{selection.ci_version}-{selection.arch}-vmlinux-{selection.kernel_version}"
        f"-{selection.rootfs_name}-{selection.rootfs_type}"
    )
