"""Ensure bundles exist: compute recipe hashes cheaply, build what is missing or corrupt, cache it.

Side effects happen in ``kernel``, ``debian``, ``rootfs`` and ``cache``; this module sequences them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exec_sandbox.errors import ImageBuildError, SandboxInputError
from exec_sandbox.settings import KernelFlavor, Settings
from smartvm.hostfs import atomic_write_file

from . import cloud_kernel, debian, kernel, rootfs
from .cache import bundle_lock, publish, scratch_dir, verify_artifacts
from .manifest import BundleManifest, KernelManifest, artifact_for, read_manifest, write_json_atomic
from .progress import ProgressCallback, ProgressEvent, ProgressKind, StepTimer, log_progress
from .recipe import (
    BOOT_ARGS,
    EXCLUDED_PACKAGES,
    KERNEL_PATCHES,
    LANGUAGES,
    AptRecord,
    LanguageSpec,
    digest_files,
    kernel_fragment_text,
    kernel_recipe_hash,
    rootfs_recipe_hash,
)

__all__ = ["ImageBuilder", "KernelBundle", "guest_dir", "staged_guest_problems"]

_PKG_DIR = Path(__file__).resolve().parent
_GUEST_DIR = _PKG_DIR.parent / "guest"


def guest_dir() -> Path:
    return _GUEST_DIR


# The build scripts' digests as of when this process loaded them: a long-running process whose
# (already imported) build code is older than the files on disk must not name its bundles after
# the newer files, or it would publish old-code bundles under the new recipe's hash.
_LOADED_SCRIPTS = digest_files(
    [
        _PKG_DIR / n
        for n in (
            "builder.py",
            "rootfs.py",
            "debian.py",
            "manifest.py",
            "process.py",
            "kernel.py",
            "cloud_kernel.py",
            "recipe/__init__.py",
        )
    ],
    root=_PKG_DIR,
)


def _script_digests(*names: str) -> dict[str, str]:
    # Keyed by file name, as before (keeps the recipe hashes of unchanged scripts stable).
    return {Path(n).name: _LOADED_SCRIPTS[n] for n in names}


def _guest_digests() -> dict[str, str]:
    files = [
        p
        for p in _GUEST_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    ]
    return digest_files(files, root=_GUEST_DIR)


def staged_guest_problems(staging: Path, expected: dict[str, str]) -> list[str]:
    """Guest files whose copy in the assembled root ``staging`` does not have the digest the
    bundle's hash was computed from (e.g. edited while the image was being built)."""
    problems: list[str] = []
    for rel, digest in sorted(expected.items()):
        staged = staging / ("sbin/init" if rel == "init" else f"opt/sbx/{rel}")
        try:
            got = digest_files([staged])[staged.name]
        except OSError:
            got = "missing"
        if got != digest:
            problems.append(rel)
    return problems


@dataclass(frozen=True)
class KernelBundle:
    path: Path
    manifest: KernelManifest


class ImageBuilder:
    """Builds and caches kernel and language bundles under ``settings.images_dir``."""

    def __init__(self, settings: Settings, progress: ProgressCallback | None = None) -> None:
        self.settings = settings
        self.progress: ProgressCallback = progress or log_progress
        self.images_dir = settings.images_dir
        self._apt = debian.AptSession(settings.cache_dir / "debs")

    # ---- recipe hashes ------------------------------------------------------------------------

    def kernel_hash(self, flavor: KernelFlavor | None = None) -> str:
        flavor = flavor or self.settings.kernel_flavor
        if flavor == "compiled":
            source = kernel.linux_source_id(self.settings.linux_source_tarball)
            scripts = _script_digests("kernel.py", "process.py")
        else:
            source = {"packages": self._cloud_pins()}
            scripts = _script_digests("cloud_kernel.py", "debian.py", "process.py") | {
                "init": cloud_kernel.initramfs_init_digest()
            }
        return kernel_recipe_hash(
            flavor=flavor,
            source_id=source,
            fragment=kernel_fragment_text(),
            scripts=scripts,
            patches=KERNEL_PATCHES,
        )

    def resolve_packages(
        self, key: str, roots: tuple[str, ...], excluded: frozenset[str] = EXCLUDED_PACKAGES
    ) -> list[dict[str, Any]]:
        """Package pins for ``roots``; asks apt only when the apt lists changed since last time."""
        fingerprint = {
            "roots": list(roots),
            "excluded": sorted(excluded),
            "apt": debian.apt_lists_fingerprint(),
            "resolver": _script_digests("debian.py", "recipe/__init__.py"),
        }
        cache_file = self.images_dir / ".resolve" / f"{key}.json"
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("fingerprint") == fingerprint:
                pins: list[dict[str, Any]] = cached["pins"]
                return pins
        except (OSError, ValueError, KeyError):
            pass
        timer = StepTimer(self.progress, f"resolve packages ({key})").start()
        records = self._apt.resolve(roots, excluded)
        pins = [r.pin() for r in records]
        timer.done(f"{len(pins)} packages")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"fingerprint": fingerprint, "pins": pins}, indent=1)
        atomic_write_file(cache_file, data.encode(), mode=0o644)
        return pins

    def bundle_hash(self, language: str, kernel_hash: str, guest: dict[str, str] | None = None) -> str:
        """``guest``: the guest files' digests (default: read them now)."""
        spec = self._spec(language)
        return rootfs_recipe_hash(
            language=language,
            packages=self.resolve_packages(language, spec.packages),
            scripts=_script_digests(
                "builder.py", "rootfs.py", "debian.py", "manifest.py", "process.py", "recipe/__init__.py"
            ),
            guest_files=guest if guest is not None else _guest_digests(),
            kernel_hash=kernel_hash,
        )

    @staticmethod
    def _spec(language: str) -> LanguageSpec:
        try:
            return LANGUAGES[language]
        except KeyError:
            raise SandboxInputError(
                f"unknown language {language!r}; valid languages: {', '.join(sorted(LANGUAGES))}",
                context={"language": language, "valid": sorted(LANGUAGES)},
            ) from None

    def _waiting(self, name: str) -> Callable[[], None]:
        def notify() -> None:
            self.progress(ProgressEvent(f"waiting for another build of {name}", ProgressKind.START))

        return notify

    # ---- kernel -------------------------------------------------------------------------------

    def ensure_kernel(self, flavor: KernelFlavor | None = None) -> KernelBundle:
        flavor = flavor or self.settings.kernel_flavor
        khash = self.kernel_hash(flavor)
        name = f"kernel-{flavor}-{khash[:16]}"
        final = self.images_dir / name
        found = self._valid_kernel(final)
        if found is not None:
            self.progress(ProgressEvent(f"kernel ({flavor})", ProgressKind.CACHED, name))
            return found
        with bundle_lock(self.images_dir, name, self._waiting(name)):
            found = self._valid_kernel(final)  # another process may have built it meanwhile
            if found is not None:
                self.progress(ProgressEvent(f"kernel ({flavor})", ProgressKind.CACHED, name))
                return found
            scratch = scratch_dir(self.images_dir, name)
            try:
                started = time.monotonic()
                manifest = self._build_kernel(flavor, khash, scratch, final)
                manifest = manifest.model_copy(update={"build_seconds": round(time.monotonic() - started, 1)})
                write_json_atomic(scratch / "kernel.json", manifest)
                publish(scratch, final)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            verify_artifacts(final, [manifest.kernel, *([manifest.initrd] if manifest.initrd else [])])
            return KernelBundle(final, manifest)

    def _valid_kernel(self, final: Path) -> KernelBundle | None:
        manifest = read_manifest(final / "kernel.json", KernelManifest)
        if manifest is None:
            return None
        artifacts = [manifest.kernel, *([manifest.initrd] if manifest.initrd else [])]
        if verify_artifacts(final, artifacts):
            return None
        return KernelBundle(final, manifest)

    def _build_kernel(self, flavor: KernelFlavor, khash: str, scratch: Path, final: Path) -> KernelManifest:
        work = scratch / "work"
        work.mkdir()
        try:
            if flavor == "compiled":
                vmlinux = kernel.build_compiled_kernel(
                    tarball=self.settings.linux_source_tarball,
                    fragment=kernel_fragment_text(),
                    jobs=self.settings.build_jobs,
                    workdir=work,
                    out_dir=scratch,
                    progress=self.progress,
                    patches=KERNEL_PATCHES,
                )
                initrd = None
                source = kernel.linux_source_id(self.settings.linux_source_tarball)
                needs_acpi, boot_args = False, BOOT_ARGS
            else:
                pins = self._cloud_pins()
                debs = self._download(pins)
                vmlinux, initrd = cloud_kernel.build_cloud_kernel(
                    debs=debs, workdir=work, out_dir=scratch, progress=self.progress
                )
                source = {"packages": pins}
                needs_acpi, boot_args = True, cloud_kernel.BOOT_ARGS
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Artifact paths point at the final location: the manifest is only read after publish().
        kernel_art = artifact_for(vmlinux).model_copy(update={"path": str(final / vmlinux.name)})
        initrd_art = (
            artifact_for(initrd).model_copy(update={"path": str(final / initrd.name)}) if initrd else None
        )
        return KernelManifest(
            recipe_hash=khash,
            kernel_flavor=flavor,
            kernel=kernel_art,
            initrd=initrd_art,
            needs_acpi=needs_acpi,
            boot_args=boot_args,
            source=source,
            build_seconds=0.0,
        )

    def _cloud_pins(self) -> list[dict[str, Any]]:
        return self.resolve_packages(
            "kernel-debian-cloud", cloud_kernel.ROOTS, EXCLUDED_PACKAGES | cloud_kernel.EXCLUDED
        )

    def _download(self, pins: list[dict[str, Any]]) -> list[Path]:
        timer = StepTimer(self.progress, "download packages").start(f"{len(pins)} packages")
        debs = self._apt.download([AptRecord.from_pin(p) for p in pins])
        timer.done()
        return debs

    # ---- language bundles ---------------------------------------------------------------------

    def bundle_dir(self, language: str, flavor: KernelFlavor | None = None) -> tuple[Path, str, str]:
        """(final directory, bundle hash, kernel hash) for ``language`` without building anything."""
        self._spec(language)
        khash = self.kernel_hash(flavor)
        bhash = self.bundle_hash(language, khash)
        return self.images_dir / f"{language}-{bhash[:16]}", bhash, khash

    def ensure_bundle(self, language: str, flavor: KernelFlavor | None = None) -> BundleManifest:
        flavor = flavor or self.settings.kernel_flavor
        self._spec(language)
        guest = _guest_digests()  # what the hash names; the assembled image is checked against it
        bhash = self.bundle_hash(language, self.kernel_hash(flavor), guest)
        final = self.images_dir / f"{language}-{bhash[:16]}"
        found = self._valid_bundle(final)
        if found is not None:
            self.progress(ProgressEvent(f"image {language}", ProgressKind.CACHED, final.name))
            return found
        if os.geteuid() != 0:
            raise ImageBuildError(
                "building guest images needs root (files in the image must be owned by root; "
                "chroot is used to byte-compile Python): run `sudo sbx images build`",
                step="rootfs",
            )
        kbundle = self.ensure_kernel(flavor)
        with bundle_lock(self.images_dir, final.name, self._waiting(final.name)):
            found = self._valid_bundle(final)
            if found is not None:
                self.progress(ProgressEvent(f"image {language}", ProgressKind.CACHED, final.name))
                return found
            scratch = scratch_dir(self.images_dir, final.name)
            try:
                manifest = self._build_bundle(language, bhash, kbundle, scratch, final, guest)
                write_json_atomic(scratch / "manifest.json", manifest)
                publish(scratch, final)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            verify_artifacts(final, manifest.artifacts())
            return manifest

    def _valid_bundle(self, final: Path) -> BundleManifest | None:
        manifest = read_manifest(final / "manifest.json", BundleManifest)
        if manifest is None or verify_artifacts(final, manifest.artifacts()):
            return None
        return manifest

    def _build_bundle(
        self,
        language: str,
        bhash: str,
        kbundle: KernelBundle,
        scratch: Path,
        final: Path,
        guest: dict[str, str],
    ) -> BundleManifest:
        times: dict[str, float] = {"kernel": kbundle.manifest.build_seconds}
        spec = self._spec(language)
        started = time.monotonic()
        pins = self.resolve_packages(language, spec.packages)
        debs = self._download(pins)
        times["download"] = round(time.monotonic() - started, 1)

        staging = scratch / "staging"
        staging.mkdir()
        started = time.monotonic()
        rootfs.assemble_rootfs(debs=debs, staging=staging, guest_dir=_GUEST_DIR, progress=self.progress)
        changed = staged_guest_problems(staging, guest)
        if changed:
            raise ImageBuildError(
                "guest files changed while the image was being built (it would not match its recipe "
                f"hash): {', '.join(changed)}; build again",
                step="rootfs",
                context={"changed": changed},
            )
        times["assemble"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        qcow2 = scratch / "rootfs.qcow2"
        virtual_size = rootfs.pack_qcow2(
            staging=staging,
            recipe_hash=bhash,
            out=qcow2,
            qemu_img=self.settings.qemu_img_binary,
            progress=self.progress,
        )
        shutil.rmtree(staging)
        times["pack"] = round(time.monotonic() - started, 1)

        km = kbundle.manifest
        # The kernel manifest records the boot args of its build, but its hash does not cover them:
        # take the current recipe's, so a BOOT_ARGS change reaches the bundle (whose hash covers
        # recipe/__init__.py) without a kernel rebuild.
        boot_args = BOOT_ARGS if km.kernel_flavor == "compiled" else cloud_kernel.BOOT_ARGS
        return BundleManifest(
            bundle_id=f"exec-sandbox-{language}-{bhash[:16]}",
            kernel=km.kernel,
            initrd=km.initrd,
            rootfs=artifact_for(qcow2).model_copy(update={"path": str(final / qcow2.name)}),
            boot_args=boot_args,
            name=f"exec_sandbox {language} image ({spec.description})",
            recipe_hash=bhash,
            language=language,
            kernel_flavor=km.kernel_flavor,
            kernel_recipe_hash=km.recipe_hash,
            needs_acpi=km.needs_acpi,
            packages=pins,
            build_seconds=times,
            rootfs_virtual_size_bytes=virtual_size,
        )
