"""BaseImageManager: kernel + rootfs bundles, fetched, verified and cached.

Presets:

* ``lts``: Firecracker's CI bucket (see :mod:`smartvm.images.lts` for the listing
  and selection rules). Sizes come from the listing, the MD5 from plain ETags;
  the sha256 computed while downloading is recorded and checked on every reuse.
  If the listing cannot be fetched, the most recently used cached ``lts`` bundle
  for this arch (and ``ci_version``, if given) is used instead, with a warning.
* ``hosted``: a :class:`~smartvm.images.manifest.HostedManifest` given by
  ``manifest_path`` or ``manifest_url``. Passing either selects this preset.
  ``path`` artifacts are copied (relative paths resolve against the manifest's
  directory), ``url`` artifacts downloaded; both are verified against
  ``sha256`` / ``size_bytes`` when given (URL artifacts must carry ``sha256``).

Each ensure holds the bundle's inter-process lock while it verifies what is
cached, fetches only what is missing or corrupt (temp file + rename), and
rewrites ``manifest.json`` with a fresh ``last_accessed_at``. A bundle that fails
to materialise is removed, so the cache never holds a half-made bundle. After
each ensure, least-recently-used bundles beyond ``max_stored_base_images`` are
evicted (one WARNING per evicted bundle); bundles locked by another ensure are
skipped.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images import lts
from smartvm.images.cache import BundleCache
from smartvm.images.download import (
    ArtifactDigest,
    Expected,
    ProgressFn,
    copy_artifact,
    download_artifact,
    http_status_error,
    verify_file,
)
from smartvm.images.manifest import (
    DEFAULT_BOOT_ARGS,
    MANIFEST_FILE_NAME,
    BaseImageBundle,
    BundleChecksums,
    FirecrackerCISource,
    HostedManifest,
    HostedManifestSource,
    ProgressEvent,
    host_arch,
    normalize_arch,
    parse_hosted_manifest,
    utc_now,
)

__all__ = ["DEFAULT_LTS_BASE_URL", "BaseImageManager", "default_cache_dir"]

log = logging.getLogger(__name__)

DEFAULT_LTS_BASE_URL = "https://s3.amazonaws.com/spec.ccfc.min"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_LISTING_PAGE_BYTES = 16 * 1024 * 1024
MAX_LISTING_PAGES = 1000

Role = Literal["kernel", "rootfs"]


def _absolute(path: Path | str) -> Path:
    """Absolute without resolving symlinks, so the path recorded is the one the caller gave."""
    return Path(path).expanduser().absolute()


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / ".smartvm" / "base-images"


@dataclass(frozen=True)
class _ArtifactPlan:
    role: Role
    file_name: str
    expected: Expected
    url: str | None = None
    path: Path | None = None

    @property
    def source(self) -> str:
        return self.url if self.url is not None else str(self.path)


@dataclass(frozen=True)
class _BundlePlan:
    bundle_id: str
    kernel: _ArtifactPlan
    rootfs: _ArtifactPlan
    fields: dict[str, Any]  # the BaseImageBundle fields that do not depend on the fetch


class BaseImageManager:
    """Fetches, verifies and caches base-image bundles (kernel + rootfs)."""

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        max_stored_base_images: int = 2,
        arch: str | None = None,
        lts_base_url: str = DEFAULT_LTS_BASE_URL,
        progress: Callable[[ProgressEvent], None] | None = None,
        *,
        http_timeout: float = 60.0,
    ) -> None:
        if (
            isinstance(max_stored_base_images, bool)
            or not isinstance(max_stored_base_images, int)
            or max_stored_base_images < 1
        ):
            raise SmartVMError(
                ErrorCode.INVALID_BASE_IMAGE_CACHE_LIMIT,
                f"max_stored_base_images must be an integer >= 1, got {max_stored_base_images!r}",
                details={"max_stored_base_images": max_stored_base_images},
            )
        parts = urlsplit(lts_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"lts_base_url {lts_base_url!r} must be an absolute http(s) URL",
                details={"lts_base_url": lts_base_url},
            )
        if http_timeout <= 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"http_timeout must be > 0, got {http_timeout}")
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._max = max_stored_base_images
        self._arch = normalize_arch(arch) if arch is not None else host_arch()
        self._lts_base_url = lts_base_url.rstrip("/")
        self._progress = progress
        self._http_timeout = http_timeout
        self._cache = BundleCache(self._cache_dir)

    # -- accessors ---------------------------------------------------------------

    def get_cache_dir(self) -> Path:
        return self._cache_dir

    def get_max_stored_base_images(self) -> int:
        return self._max

    def get_arch(self) -> str:
        return self._arch

    def get_lts_base_url(self) -> str:
        return self._lts_base_url

    # -- public operations -------------------------------------------------------

    async def ensure_base_image(
        self,
        preset: str = "lts",
        *,
        manifest_path: Path | str | None = None,
        manifest_url: str | None = None,
        ci_version: str | None = None,
    ) -> BaseImageBundle:
        """Return a verified cached bundle, fetching whatever is missing or corrupt."""
        if preset not in ("lts", "hosted"):
            raise SmartVMError(
                ErrorCode.INVALID_PRESET,
                f"unknown base image preset {preset!r}; expected 'lts' or 'hosted'",
                details={"preset": preset},
            )
        if manifest_path is not None and manifest_url is not None:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "pass manifest_path or manifest_url, not both")
        if manifest_path is not None or manifest_url is not None:
            if ci_version is not None:
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "ci_version applies to the 'lts' preset only")
            plan = await self._hosted_plan(manifest_path, manifest_url)
        elif preset == "hosted":
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                "the 'hosted' preset needs a manifest: pass manifest_path or manifest_url",
                details={"preset": preset},
            )
        else:
            plan = await self._lts_plan(ci_version)
        bundle = await self._materialize(plan)
        await self.prune_base_image_cache(keep_bundle_id=bundle.bundle_id)
        return bundle

    async def list_base_images(self) -> list[BaseImageBundle]:
        """Cached bundles, most recently used first."""
        return await asyncio.to_thread(self._cache.list)

    async def get_base_image(self, bundle_id: str) -> BaseImageBundle | None:
        self._cache.bundle_dir(bundle_id)
        return await asyncio.to_thread(self._cache.read, bundle_id)

    async def prune_base_image_cache(self, keep_bundle_id: str | None = None) -> list[str]:
        """Evict least-recently-used bundles beyond the limit; returns the evicted ids."""
        bundles = await asyncio.to_thread(self._cache.list)
        needed = len(bundles) - self._max
        if needed <= 0:
            return []
        candidates = sorted(
            (b for b in bundles if b.bundle_id != keep_bundle_id),
            key=lambda b: (b.last_accessed_at, b.bundle_id),
        )
        evicted: list[str] = []
        for bundle in candidates:
            if len(evicted) >= needed:
                break
            lock = self._cache.lock(bundle.bundle_id)
            if not lock.try_acquire():
                log.debug("not evicting base image bundle %s: in use by another ensure", bundle.bundle_id)
                continue
            try:
                removed = await asyncio.to_thread(self._cache.delete, bundle.bundle_id)
            finally:
                lock.release()
            if removed:
                log.warning(
                    "Evicting old base image bundle %s (last accessed %s); cache limit is %d bundles",
                    bundle.bundle_id,
                    bundle.last_accessed_at.isoformat(),
                    self._max,
                )
                evicted.append(bundle.bundle_id)
        return evicted

    async def remove_base_image(self, bundle_id: str) -> bool:
        """Delete one cached bundle; ``False`` if it was not cached."""
        async with self._cache.lock(bundle_id):
            return await asyncio.to_thread(self._cache.delete, bundle_id)

    # -- planning ----------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self._http_timeout, connect=min(self._http_timeout, 15.0)),
            follow_redirects=True,
        )

    async def _hosted_plan(self, manifest_path: Path | str | None, manifest_url: str | None) -> _BundlePlan:
        if manifest_path is not None:
            path = _absolute(manifest_path)
            try:
                raw = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                raise SmartVMError(
                    ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                    f"cannot read manifest {path}: {exc.strerror or exc}",
                    details={"manifest_path": str(path)},
                ) from exc
            manifest = parse_hosted_manifest(raw, origin=str(path), expected_arch=self._arch)
            return self._plan_from_manifest(
                manifest, base_dir=path.parent, source=HostedManifestSource(manifest_path=str(path))
            )
        assert manifest_url is not None
        raw = await self._fetch_manifest(manifest_url)
        manifest = parse_hosted_manifest(raw, origin=manifest_url, expected_arch=self._arch)
        return self._plan_from_manifest(
            manifest, base_dir=None, source=HostedManifestSource(manifest_url=manifest_url)
        )

    async def _fetch_manifest(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"manifest_url {url!r} must be an absolute http(s) URL",
                details={"manifest_url": url},
            )
        return await self._get_bounded(url, MAX_MANIFEST_BYTES, what="manifest")

    async def _get_bounded(
        self, url: str, limit: int, *, what: str, client: httpx.AsyncClient | None = None
    ) -> bytes:
        """GET a small document; failures are BASE_IMAGE_MANIFEST_FAILED."""
        try:
            if client is None:
                async with self._client() as own:
                    return await self._read_bounded(own, url, limit, what)
            return await self._read_bounded(client, url, limit, what)
        except httpx.HTTPError as exc:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                f"fetching {what} {url} failed: {type(exc).__name__}: {exc}",
                details={"url": url},
                retryable=True,
            ) from exc

    @staticmethod
    async def _read_bounded(client: httpx.AsyncClient, url: str, limit: int, what: str) -> bytes:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise http_status_error(
                    ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                    f"fetching {what} {url} returned HTTP {response.status_code}",
                    response.status_code,
                    url,
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise SmartVMError(
                        ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                        f"{what} {url} is larger than {limit} bytes",
                        details={"url": url},
                    )
            return bytes(body)

    def _plan_from_manifest(
        self, manifest: HostedManifest, *, base_dir: Path | None, source: HostedManifestSource
    ) -> _BundlePlan:
        def artifact(role: Role) -> _ArtifactPlan:
            spec = manifest.kernel if role == "kernel" else manifest.rootfs
            file_name = manifest.kernel_file_name if role == "kernel" else manifest.rootfs_file_name
            expected = Expected(sha256=spec.sha256, size=spec.size_bytes)
            if spec.url is not None:
                return _ArtifactPlan(role, file_name, expected, url=spec.url)
            assert spec.path is not None
            path = Path(spec.path).expanduser()
            if not path.is_absolute():
                if base_dir is None:
                    raise SmartVMError(
                        ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
                        f"{role}.path {spec.path!r} must be absolute in a manifest fetched by URL",
                        details={"origin": source.manifest_url or ""},
                    )
                path = base_dir / path
            return _ArtifactPlan(role, file_name, expected, path=path)

        fields: dict[str, Any] = {
            "preset": "hosted",
            "arch": manifest.arch,
            "name": manifest.name,
            "firecracker_version": manifest.firecracker_version,
            "rootfs_type": manifest.rootfs_type,
            "rootfs_is_read_only": manifest.rootfs_is_read_only,
            "boot_args": manifest.boot_args,
            "source": source,
        }
        return _BundlePlan(manifest.bundle_id, artifact("kernel"), artifact("rootfs"), fields)

    async def _lts_plan(self, ci_version: str | None) -> _BundlePlan:
        if ci_version is not None:
            lts.parse_ci_version(ci_version)
        try:
            async with self._client() as client:
                if ci_version is None:
                    _, prefixes = await self._list_bucket(client, lts.CI_ROOT_PREFIX, delimiter="/")
                    ci_version = lts.select_ci_version(prefixes)
                objects, _ = await self._list_bucket(client, lts.ci_prefix(ci_version, self._arch))
        except SmartVMError as exc:
            if exc.code != ErrorCode.BASE_IMAGE_MANIFEST_FAILED:
                raise
            fallback = await self._cached_lts_plan(ci_version)
            if fallback is None:
                raise
            log.warning(
                "Firecracker CI bucket listing failed (%s); using cached bundle %s", exc, fallback.bundle_id
            )
            return fallback
        selection = lts.select_artifacts(objects, ci_version=ci_version, arch=self._arch)
        return self._plan_from_selection(selection)

    def _plan_from_selection(self, selection: lts.LtsSelection) -> _BundlePlan:
        base = self._lts_base_url
        kernel = _ArtifactPlan(
            "kernel",
            "vmlinux",
            Expected(size=selection.kernel.size, md5=selection.kernel.md5),
            url=lts.artifact_url(base, selection.kernel.key),
        )
        rootfs = _ArtifactPlan(
            "rootfs",
            f"rootfs.{selection.rootfs_type}",
            Expected(size=selection.rootfs.size, md5=selection.rootfs.md5),
            url=lts.artifact_url(base, selection.rootfs.key),
        )
        fields: dict[str, Any] = {
            "preset": "lts",
            "arch": selection.arch,
            "name": (
                f"Firecracker CI {selection.ci_version} {selection.arch} "
                f"(vmlinux-{selection.kernel_version}, {selection.rootfs_name}.{selection.rootfs_type})"
            ),
            "ci_version": selection.ci_version,
            # CI artifacts are published per minor line; .0 is the first release they serve.
            "firecracker_version": f"{selection.ci_version}.0",
            "rootfs_type": selection.rootfs_type,
            "rootfs_is_read_only": selection.rootfs_type == "squashfs",
            "boot_args": DEFAULT_BOOT_ARGS,
            "source": FirecrackerCISource(
                bucket_url=base, kernel_key=selection.kernel.key, rootfs_key=selection.rootfs.key
            ),
        }
        return _BundlePlan(lts.lts_bundle_id(selection), kernel, rootfs, fields)

    async def _cached_lts_plan(self, ci_version: str | None) -> _BundlePlan | None:
        for bundle in await self.list_base_images():
            if bundle.preset != "lts" or bundle.arch != self._arch:
                continue
            if ci_version is not None and bundle.ci_version != ci_version:
                continue
            src = bundle.source
            if not isinstance(src, FirecrackerCISource):
                continue
            sums = bundle.checksums
            kernel = _ArtifactPlan(
                "kernel",
                Path(bundle.kernel_image_path).name,
                Expected(sha256=sums.kernel_sha256, size=bundle.kernel_size_bytes),
                url=lts.artifact_url(src.bucket_url, src.kernel_key),
            )
            rootfs = _ArtifactPlan(
                "rootfs",
                Path(bundle.rootfs_path).name,
                Expected(sha256=sums.rootfs_sha256, size=bundle.rootfs_size_bytes),
                url=lts.artifact_url(src.bucket_url, src.rootfs_key),
            )
            fields = bundle.model_dump(
                include={"preset", "arch", "name", "ci_version", "firecracker_version", "rootfs_type",
                         "rootfs_is_read_only", "boot_args"}
            )
            fields["source"] = src
            return _BundlePlan(bundle.bundle_id, kernel, rootfs, fields)
        return None

    async def _list_bucket(
        self, client: httpx.AsyncClient, prefix: str, *, delimiter: str | None = None
    ) -> tuple[list[lts.S3Object], list[str]]:
        objects: list[lts.S3Object] = []
        prefixes: list[str] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_LISTING_PAGES):
            url = lts.listing_url(self._lts_base_url, prefix, continuation_token=token, delimiter=delimiter)
            raw = await self._get_bounded(url, MAX_LISTING_PAGE_BYTES, what="bucket listing", client=client)
            page = lts.parse_listing(raw, origin=url)
            objects.extend(page.objects)
            prefixes.extend(page.common_prefixes)
            token = page.next_continuation_token
            if token is None:
                return objects, prefixes
            if token in seen:
                raise SmartVMError(
                    ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                    f"bucket listing for {prefix} repeats continuation token {token!r}",
                    details={"prefix": prefix},
                )
            seen.add(token)
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
            f"bucket listing for {prefix} exceeds {MAX_LISTING_PAGES} pages",
            details={"prefix": prefix},
        )

    # -- materialising -------------------------------------------------------------

    def _emit(self, event: ProgressEvent) -> None:
        if self._progress is None:
            return
        try:
            self._progress(event)
        except Exception:
            # A broken progress display must not abort a download.
            log.exception("base image progress callback failed")

    def _reporter(self, bundle_id: str, plan: _ArtifactPlan) -> ProgressFn:
        def report(phase: str, done: int, total: int | None) -> None:
            self._emit(ProgressEvent.model_validate(
                {"bundle_id": bundle_id, "artifact": plan.role, "phase": phase, "bytes_done": done,
                 "bytes_total": total, "source": plan.source}
            ))

        return report

    async def _fetch(self, client: httpx.AsyncClient, bundle_id: str, plan: _ArtifactPlan, dest: Path
                     ) -> ArtifactDigest:
        report = self._reporter(bundle_id, plan)
        if plan.url is not None:
            return await download_artifact(client, plan.url, dest, plan.expected, progress=report)
        assert plan.path is not None
        return await copy_artifact(plan.path, dest, plan.expected, progress=report)

    async def _materialize(self, plan: _BundlePlan) -> BaseImageBundle:
        cache = self._cache
        bundle_dir = cache.bundle_dir(plan.bundle_id)
        async with cache.lock(plan.bundle_id):
            cached = await asyncio.to_thread(cache.read, plan.bundle_id)
            try:
                await asyncio.to_thread(bundle_dir.mkdir, parents=True, exist_ok=True)
                digests: dict[Role, ArtifactDigest] = {}
                all_reused = True
                async with self._client() as client:
                    for artifact in (plan.kernel, plan.rootfs):
                        dest = bundle_dir / artifact.file_name
                        digest = await verify_file(dest, self._reuse_expectation(artifact, cached))
                        if digest is not None:
                            self._emit(ProgressEvent(
                                bundle_id=plan.bundle_id, artifact=artifact.role, phase="cached",
                                bytes_done=digest.size, bytes_total=digest.size, source=artifact.source))
                        else:
                            all_reused = False
                            digest = await self._fetch(client, plan.bundle_id, artifact, dest)
                        digests[artifact.role] = digest
                now = utc_now()
                try:
                    bundle = BaseImageBundle(
                        **plan.fields,
                        bundle_id=plan.bundle_id,
                        bundle_dir=str(bundle_dir),
                        kernel_image_path=str(bundle_dir / plan.kernel.file_name),
                        rootfs_path=str(bundle_dir / plan.rootfs.file_name),
                        checksums=BundleChecksums(
                            kernel_sha256=digests["kernel"].sha256, rootfs_sha256=digests["rootfs"].sha256
                        ),
                        kernel_size_bytes=digests["kernel"].size,
                        rootfs_size_bytes=digests["rootfs"].size,
                        created_at=cached.created_at if (cached is not None and all_reused) else now,
                        last_accessed_at=now,
                    )
                except ValidationError as exc:  # a bug in a plan, not user input
                    raise SmartVMError(
                        ErrorCode.INVALID_BASE_IMAGE_MANIFEST, f"cannot record bundle {plan.bundle_id}: {exc}"
                    ) from exc
                await asyncio.to_thread(cache.write, bundle)
                keep = {plan.kernel.file_name, plan.rootfs.file_name, MANIFEST_FILE_NAME}
                await asyncio.to_thread(cache.remove_strays, plan.bundle_id, keep)
                return bundle
            except BaseException:
                # Never leave a half-made bundle behind (this also runs on cancellation;
                # the rename inside delete() makes it vanish at once).
                cache.delete(plan.bundle_id)
                raise

    @staticmethod
    def _reuse_expectation(artifact: _ArtifactPlan, cached: BaseImageBundle | None) -> Expected:
        """What a file already in the bundle must match to be reused without fetching."""
        expected = artifact.expected
        # A local source without a sha256 may have changed since it was copied: copy it again.
        if expected.sha256 is not None or cached is None or artifact.path is not None:
            return expected
        cached_path = cached.kernel_image_path if artifact.role == "kernel" else cached.rootfs_path
        sums = cached.checksums
        recorded = sums.kernel_sha256 if artifact.role == "kernel" else sums.rootfs_sha256
        if recorded is None or Path(cached_path).name != artifact.file_name:
            return expected
        return Expected(sha256=recorded, size=expected.size, md5=expected.md5)
