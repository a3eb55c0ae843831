"""What one L1 snapshot cache entry is, apart from the cache: the key inputs (everything that shapes
the guest), the manifest with a sha256 per file, verification before use, host facts that enter the
key (QEMU version, accelerator) and the cross-process file lock. The cache itself is
:mod:`exec_sandbox.vm.snapshots`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exec_sandbox.errors import SandboxPermanentError, SandboxTransientError
from exec_sandbox.images.manifest import BundleManifest
from exec_sandbox.protocol.agent import PROTOCOL_VERSION
from exec_sandbox.settings import Settings
from exec_sandbox.vm.spec import SNAPSHOT_FORMAT, VmOptions
from smartvm.filelock import FileLock as SmartvmFileLock
from smartvm.hostfs import UnsafePathError, atomic_write_file
from smartvm.process import run_tool
from smartvm.qemu.accel import choose_accelerator

__all__ = [
    "CACHE_FORMAT",
    "FileDigest",
    "SnapshotKeyInputs",
    "SnapshotManifest",
    "build_key_inputs",
    "cacheable_reason",
    "parse_qemu_version",
    "qemu_version",
]

logger = logging.getLogger(__name__)


# Bump when the entry layout or the meaning of a key input changes.
# 2: TCG guests boot with the host TSC rate (smartvm.qemu.with_host_tsc); older entries tick on the PIT.
CACHE_FORMAT = 2


_HASH_CHUNK = 1 << 20


SNAPSHOT_SUBDIR = "snapshot"


# VmOptions fields that do not change the guest (only how long we wait for it).
_NOT_IN_KEY = frozenset({"boot_timeout_s"})


class SnapshotKeyInputs(BaseModel):
    """Everything a cached snapshot depends on; :meth:`key` hashes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    language: str
    recipe_hash: str
    rootfs_sha256: str
    kernel_sha256: str
    initrd_sha256: str | None
    kernel_recipe_hash: str
    boot_args: str
    memory_mb: int
    vcpus: int
    options: dict[str, Any]  # the rest of VmOptions (env, kernel args, flavor, ...), as JSON
    qemu_version: str
    accelerator: str
    agent_protocol_version: int
    snapshot_format: int
    cache_format: int
    warmup_spare: bool

    def key(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:40]


def cacheable_reason(options: VmOptions) -> str | None:
    """Why ``options`` must not be served from the cache (None: it may be)."""
    if options.network:
        return "networked guests hold host-side NAT state that a snapshot cannot carry"
    if options.port_forwards:
        return "port forwards bind host ports that a restored clone cannot share"
    return None


def build_key_inputs(
    options: VmOptions,
    manifest: BundleManifest,
    *,
    qemu_version: str,
    accelerator: str,
    warmup_spare: bool,
) -> SnapshotKeyInputs:
    """The key inputs of ``options`` booted from the bundle described by ``manifest``. Pure."""
    dumped = options.model_dump(mode="json", exclude=set(_NOT_IN_KEY))
    rest = {k: v for k, v in dumped.items() if k not in ("language", "memory_mb", "vcpus")}
    return SnapshotKeyInputs(
        language=options.language,
        recipe_hash=manifest.recipe_hash,
        rootfs_sha256=manifest.rootfs.sha256,
        kernel_sha256=manifest.kernel.sha256,
        initrd_sha256=manifest.initrd.sha256 if manifest.initrd else None,
        kernel_recipe_hash=manifest.kernel_recipe_hash,
        boot_args=manifest.boot_args,
        memory_mb=options.memory_mb,
        vcpus=options.vcpus,
        options=rest,
        qemu_version=qemu_version,
        accelerator=accelerator,
        agent_protocol_version=PROTOCOL_VERSION,
        snapshot_format=SNAPSHOT_FORMAT,
        cache_format=CACHE_FORMAT,
        warmup_spare=warmup_spare,
    )


def parse_qemu_version(text: str) -> str:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> the whole first line (the package build counts)."""
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not first.startswith("QEMU emulator version"):
        raise ValueError(f"not a QEMU --version output: {first!r}")
    return first


class FileDigest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class SnapshotManifest(BaseModel):
    """``<key>/manifest.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_format: int
    key: str
    inputs: SnapshotKeyInputs
    files: dict[str, FileDigest]  # relative to <key>/snapshot
    created_at: float
    source_vm_id: str


_QEMU_VERSIONS: dict[str, str] = {}


async def qemu_version(binary: str) -> str:
    """First line of ``<binary> --version`` (memoised per binary for this process)."""
    cached = _QEMU_VERSIONS.get(binary)
    if cached is not None:
        return cached
    try:
        result = await run_tool([binary, "--version"])
        version = parse_qemu_version(result.stdout.decode(errors="replace"))
    except (OSError, ValueError) as exc:
        raise SandboxTransientError(
            f"cannot read the QEMU version from {binary!r}: {exc}", context={"binary": binary}
        ) from exc
    _QEMU_VERSIONS[binary] = version
    return version


@functools.cache
def _probed_accelerator() -> str:
    return choose_accelerator(None).accel


def accelerator_for(options: VmOptions, settings: Settings) -> str:
    # Mirrors SandboxVm: an explicit option, then Settings.force_emulation, then smartvm's probe.
    if options.accel is not None:
        return options.accel
    if settings.force_emulation:
        return "tcg"
    return _probed_accelerator()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def stat_id(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# (device, inode, size, mtime) -> sha256: a file this process already hashed and nobody changed since.
# Keyed by inode, not path, so an entry hashed while being written is not re-hashed after its rename.
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


def _digest_cached(path: Path) -> str:
    ident = stat_id(path)
    seen = _VERIFIED.get(ident)
    if seen is not None:
        return seen
    digest = _sha256_file(path)
    if stat_id(path) == ident:  # not modified while hashing
        _VERIFIED[ident] = digest
    return digest


class CorruptEntry(Exception):
    """An entry failed verification (the message says how)."""


def _list_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def verify_entry(entry: Path, key: str) -> SnapshotManifest:
    try:
        manifest = SnapshotManifest.model_validate_json((entry / "manifest.json").read_bytes())
    except (OSError, ValidationError, ValueError) as exc:
        raise CorruptEntry(f"manifest unreadable: {exc}") from exc
    if manifest.cache_format != CACHE_FORMAT or manifest.key != key or manifest.inputs.key() != key:
        raise CorruptEntry("manifest does not belong to this key")
    root = entry / SNAPSHOT_SUBDIR
    present = _list_files(root) if root.is_dir() else []
    if present != sorted(manifest.files):
        raise CorruptEntry(f"files {present} differ from the manifest's {sorted(manifest.files)}")
    for rel, want in manifest.files.items():
        path = root / rel
        if path.is_symlink():
            raise CorruptEntry(f"{rel} is a symlink")
        size = path.stat().st_size
        if size != want.size:
            raise CorruptEntry(f"{rel} has {size} bytes, the manifest says {want.size}")
        got = _digest_cached(path)
        if got != want.sha256:
            raise CorruptEntry(f"{rel} has sha256 {got}, the manifest says {want.sha256}")
    # The disk copy is an overlay whose backing file is the image's base: without it, no restore.
    try:
        base = Path(json.loads((root / "sandbox.json").read_text())["base_image"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"sandbox.json unreadable: {exc}") from exc
    if not base.is_file():
        raise CorruptEntry(f"its base image {base} no longer exists")
    return manifest


def write_manifest(tmp_entry: Path, key: str, inputs: SnapshotKeyInputs, vm_id: str) -> None:
    root = tmp_entry / SNAPSHOT_SUBDIR
    files = {}
    for rel in _list_files(root):
        path = root / rel
        files[rel] = FileDigest(sha256=_digest_cached(path), size=path.stat().st_size)
    manifest = SnapshotManifest(
        cache_format=CACHE_FORMAT,
        key=key,
        inputs=inputs,
        files=files,
        created_at=time.time(),
        source_vm_id=vm_id,
    )
    atomic_write_file(tmp_entry / "manifest.json", manifest.model_dump_json(indent=1).encode(), fsync=True)


class FileLock(SmartvmFileLock):
    """:class:`smartvm.filelock.FileLock` whose unsafe lock directory is this cache's error."""

    def try_acquire(self, *, shared: bool) -> bool:
        try:
            return super().try_acquire(shared=shared)
        except UnsafePathError as exc:
            raise SandboxPermanentError(
                f"the snapshot cache is not safe to use: {exc.message}",
                context={"path": str(exc.path), "problem": exc.problem},
            ) from exc
