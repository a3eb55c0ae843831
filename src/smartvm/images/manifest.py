"""Pure models and validation for base-image manifests.

Two documents live here:

* the *hosted manifest* a user (or ``exec_sandbox``'s image builder) publishes to
  describe a bundle: ``schema_version``, ``bundle_id``, ``arch``,
  ``firecracker_version``, ``rootfs_type``, ``kernel`` / ``rootfs`` artifacts
  (each a local ``path`` or a ``url``, with ``file_name``, ``sha256``,
  ``size_bytes``), optional ``name``, ``rootfs_is_read_only``, ``boot_args``;
* the *cached bundle manifest* (``<cache>/<bundle_id>/manifest.json``) written by
  :class:`smartvm.BaseImageManager`, modelled by :class:`BaseImageBundle`.

Nothing here touches the filesystem or the network. Every rejection is a
:class:`SmartVMError` with code ``INVALID_BASE_IMAGE_MANIFEST`` naming the field.
"""

from __future__ import annotations

import json
import platform
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from smartvm.errors import ErrorCode, SmartVMError

__all__ = [
    "DEFAULT_BOOT_ARGS",
    "MANIFEST_FILE_NAME",
    "SUPPORTED_ARCHES",
    "ArtifactSpec",
    "BaseImageBundle",
    "BundleChecksums",
    "FirecrackerCISource",
    "HostedManifest",
    "HostedManifestSource",
    "ProgressEvent",
    "RootfsType",
    "format_timestamp",
    "host_arch",
    "normalize_arch",
    "parse_bundle_manifest",
    "parse_hosted_manifest",
    "utc_now",
    "validate_bundle_id",
    "validate_file_name",
]

SUPPORTED_ARCHES: tuple[str, ...] = ("x86_64", "aarch64")
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
MANIFEST_FILE_NAME = "manifest.json"

RootfsType = Literal["ext4", "squashfs", "qcow2", "raw"]

# Bundle ids become directory names under the cache: no separators, no leading dot
# (dot-entries are the cache's own lock/temp files), bounded length.
_BUNDLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def normalize_arch(arch: str) -> str:
    """Map ``platform.machine()`` spellings onto ``x86_64`` / ``aarch64``."""
    normalized = _ARCH_ALIASES.get(arch.strip().lower())
    if normalized is None:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"unsupported architecture {arch!r}; expected one of {', '.join(SUPPORTED_ARCHES)}",
            details={"arch": arch},
        )
    return normalized


def host_arch() -> str:
    return normalize_arch(platform.machine())


def validate_bundle_id(bundle_id: str) -> str:
    """Return ``bundle_id`` if it is a safe single directory name, else raise ValueError."""
    if not isinstance(bundle_id, str) or not _BUNDLE_ID_RE.fullmatch(bundle_id) or ".." in bundle_id:
        raise ValueError(
            f"bundle_id {bundle_id!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (max 128 chars, no '..')"
        )
    return bundle_id


def validate_file_name(file_name: str) -> str:
    """Return ``file_name`` if it names a plain file inside the bundle dir, else raise ValueError."""
    if (
        not file_name
        or len(file_name) > 255
        or "/" in file_name
        or "\\" in file_name
        or "\x00" in file_name
        or file_name.startswith(".")
        or file_name == MANIFEST_FILE_NAME
    ):
        raise ValueError(
            f"file_name {file_name!r} must be a plain file name (no path separators, no leading '.', "
            f"not {MANIFEST_FILE_NAME!r})"
        )
    return file_name


def utc_now() -> datetime:
    """Now, truncated to the millisecond precision manifests store (so round trips compare equal)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def format_timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z`` suffix (JavaScript's toISOString)."""
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class ArtifactSpec(BaseModel):
    """One artifact of a hosted manifest: exactly one of ``path`` / ``url``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    url: str | None = None
    file_name: str | None = None
    sha256: str | None = None
    size_bytes: Annotated[int, Field(ge=0)] | None = None

    @field_validator("file_name")
    @classmethod
    def _check_file_name(cls, value: str | None) -> str | None:
        return None if value is None else validate_file_name(value)

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        lowered = value.strip().lower()
        if not _SHA256_RE.fullmatch(lowered):
            raise ValueError("sha256 must be 64 hexadecimal characters")
        return lowered

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url {value!r} must be an absolute http(s) URL")
        return value

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\x00" in value):
            raise ValueError("path must be a non-empty path")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ArtifactSpec:
        if (self.path is None) == (self.url is None):
            raise ValueError("exactly one of 'path' or 'url' is required")
        if self.url is not None and self.sha256 is None:
            raise ValueError("an artifact fetched by 'url' requires 'sha256'")
        return self


class HostedManifest(BaseModel):
    """A published bundle description (``preset="hosted"``).

    Unknown top-level keys are ignored so producers may add metadata; unknown
    artifact keys are rejected because a typo there could silently drop a checksum.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1]
    bundle_id: str
    arch: str
    firecracker_version: Annotated[str, Field(pattern=r"^v?\d+\.\d+(\.\d+)?([-.+][0-9A-Za-z.+-]+)?$")]
    rootfs_type: RootfsType
    kernel: ArtifactSpec
    rootfs: ArtifactSpec
    name: str | None = None
    rootfs_is_read_only: bool = False
    boot_args: str = DEFAULT_BOOT_ARGS

    @field_validator("bundle_id")
    @classmethod
    def _check_bundle_id(cls, value: str) -> str:
        return validate_bundle_id(value)

    @field_validator("arch")
    @classmethod
    def _check_arch(cls, value: str) -> str:
        if value not in SUPPORTED_ARCHES:
            raise ValueError(f"arch must be one of {', '.join(SUPPORTED_ARCHES)}")
        return value

    @model_validator(mode="after")
    def _distinct_file_names(self) -> HostedManifest:
        if self.kernel_file_name == self.rootfs_file_name:
            raise ValueError(f"kernel and rootfs resolve to the same file_name {self.kernel_file_name!r}")
        return self

    @property
    def kernel_file_name(self) -> str:
        return self.kernel.file_name or "vmlinux"

    @property
    def rootfs_file_name(self) -> str:
        return self.rootfs.file_name or f"rootfs.{self.rootfs_type}"


class ProgressEvent(BaseModel):
    """Reported to the ``progress`` callback while a bundle is being ensured."""

    model_config = ConfigDict(frozen=True)

    bundle_id: str
    artifact: Literal["kernel", "rootfs"]
    phase: Literal["start", "progress", "done", "cached"]
    bytes_done: int
    bytes_total: int | None = None
    source: str


class FirecrackerCISource(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["firecracker-ci"] = "firecracker-ci"
    bucket_url: str
    kernel_key: str
    rootfs_key: str


class HostedManifestSource(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["hosted-manifest"] = "hosted-manifest"
    manifest_path: str | None = None
    manifest_url: str | None = None


class BundleChecksums(BaseModel):
    model_config = ConfigDict(extra="ignore")

    kernel_sha256: str | None = None
    rootfs_sha256: str | None = None


class BaseImageBundle(BaseModel):
    """A cached bundle, exactly as stored in ``<cache>/<bundle_id>/manifest.json``."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = 1
    preset: Literal["lts", "hosted"]
    arch: str
    bundle_id: str
    bundle_dir: str
    name: str | None = None
    ci_version: str | None = None
    firecracker_version: str | None = None
    kernel_image_path: str
    rootfs_path: str
    rootfs_type: RootfsType
    rootfs_is_read_only: bool = False
    boot_args: str = DEFAULT_BOOT_ARGS
    source: Annotated[FirecrackerCISource | HostedManifestSource, Field(discriminator="type")]
    checksums: BundleChecksums = Field(default_factory=BundleChecksums)
    kernel_size_bytes: int | None = None
    rootfs_size_bytes: int | None = None
    created_at: datetime
    last_accessed_at: datetime

    @field_validator("bundle_id")
    @classmethod
    def _check_bundle_id(cls, value: str) -> str:
        return validate_bundle_id(value)

    @field_validator("created_at", "last_accessed_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @field_serializer("created_at", "last_accessed_at")
    def _serialize_ts(self, value: datetime) -> str:
        return format_timestamp(value)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in error["loc"]) or "<root>"
        parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)


def _load_json(raw: str | bytes, origin: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"manifest {origin} is not valid JSON: {exc}",
            details={"origin": origin},
        ) from exc


def parse_hosted_manifest(
    raw: str | bytes, *, origin: str, expected_arch: str | None = None
) -> HostedManifest:
    """Parse and validate a hosted manifest; ``origin`` (path or URL) appears in errors."""
    data = _load_json(raw, origin)
    if not isinstance(data, dict):
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"manifest {origin} must be a JSON object, got {type(data).__name__}",
            details={"origin": origin},
        )
    try:
        manifest = HostedManifest.model_validate(data)
    except ValidationError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"manifest {origin} is invalid: {_describe(exc)}",
            details={"origin": origin},
        ) from exc
    if expected_arch is not None and manifest.arch != expected_arch:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"manifest {origin} is for arch {manifest.arch!r} but this manager targets {expected_arch!r}",
            details={"origin": origin, "arch": manifest.arch, "expected_arch": expected_arch},
        )
    return manifest


def parse_bundle_manifest(raw: str | bytes, *, origin: str) -> BaseImageBundle:
    """Parse a cached bundle's ``manifest.json``."""
    data = _load_json(raw, origin)
    try:
        return BaseImageBundle.model_validate(data)
    except ValidationError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"cached bundle manifest {origin} is invalid: {_describe(exc)}",
            details={"origin": origin},
        ) from exc
