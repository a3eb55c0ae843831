"""Bundle manifests in smartvm's hosted-manifest format, plus exec_sandbox's own fields.

``smartvm.BaseImageManager`` ingests the common part (schema_version, bundle_id, arch,
firecracker_version, rootfs_type, kernel{}, rootfs{}, boot_args, name) and ignores the rest.
``firecracker_version`` is ``"0.0.0+qemu-microvm"``: these bundles target QEMU microvm and no
Firecracker release was involved in building or validating them, but the format requires a
version-shaped string (smartvm validates it), so the marker is a null version with a build tag.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from smartvm.hostfs import atomic_write_file

__all__ = [
    "Artifact",
    "BundleManifest",
    "KernelManifest",
    "artifact_for",
    "read_manifest",
    "sha256_file",
    "write_json_atomic",
]

NOT_FIRECRACKER = "0.0.0+qemu-microvm"

_M = TypeVar("_M", bound=BaseModel)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Artifact(BaseModel):
    """One file of a bundle: where it is and what it must hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    file_name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


def artifact_for(path: Path, file_name: str | None = None) -> Artifact:
    return Artifact(
        path=str(path),
        file_name=file_name or path.name,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
    )


class KernelManifest(BaseModel):
    """``kernel.json`` of a shared kernel bundle (``kernel-<flavor>-<hash>/``)."""

    model_config = ConfigDict(extra="forbid")

    recipe_hash: str
    kernel_flavor: Literal["compiled", "debian-cloud"]
    kernel: Artifact
    initrd: Artifact | None = None
    needs_acpi: bool
    boot_args: str
    source: dict[str, Any]
    build_seconds: float


class BundleManifest(BaseModel):
    """``manifest.json`` of a language bundle (``<language>-<hash>/``)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    bundle_id: str
    arch: str = "x86_64"
    firecracker_version: str = NOT_FIRECRACKER
    rootfs_type: Literal["qcow2"] = "qcow2"
    kernel: Artifact
    rootfs: Artifact
    boot_args: str
    name: str
    # exec_sandbox's own fields
    recipe_hash: str
    language: str
    kernel_flavor: Literal["compiled", "debian-cloud"]
    kernel_recipe_hash: str
    initrd: Artifact | None = None
    needs_acpi: bool
    packages: list[dict[str, Any]]
    build_seconds: dict[str, float]
    rootfs_virtual_size_bytes: int

    def artifacts(self) -> list[Artifact]:
        return [a for a in (self.kernel, self.rootfs, self.initrd) if a is not None]


def write_json_atomic(path: Path, model: BaseModel) -> None:
    """Through :func:`smartvm.hostfs.atomic_write_file` (unpredictable temp name, ``O_EXCL``, rename);
    0644: a bundle manifest holds no user data."""
    data = json.dumps(model.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    atomic_write_file(path, data.encode(), mode=0o644)


def read_manifest(path: Path, model: type[_M]) -> _M | None:
    """The parsed manifest, or None when it is missing or unreadable (treated as "not built")."""
    try:
        return model.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None
