"""Debian packages without a package manager in the guest: resolve, download, extract.

Resolution: each root is pinned to its highest *downloadable* version (an installed-only version,
e.g. a vendor's nodejs, has no Filename and cannot be fetched), then ``apt-cache depends --recurse``
restricted to Depends/PreDepends gives the graph, and :func:`recipe.dependency_closure` drops the
packages listed in ``recipe.EXCLUDED_PACKAGES``. Downloads go to a shared .deb cache and are checked
against the sha256 from the apt lists. When apt has no (or stale) lists, ``apt-get update`` runs
once (as root) and the step is retried.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exec_sandbox.errors import ImageBuildError

from .process import run
from .recipe import AptRecord, dependency_closure, parse_apt_depends, parse_apt_show, pick_downloadable

__all__ = ["AptSession", "apt_lists_fingerprint", "deb_file_name", "extract_deb"]

_DEPENDS_FLAGS = [
    "--recurse",
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
]
APT_LISTS = Path("/var/lib/apt/lists")
DPKG_STATUS = Path("/var/lib/dpkg/status")


def apt_lists_fingerprint() -> dict[str, Any]:
    """What apt's answers depend on, cheaply: the package lists' names, sizes and mtimes (plus dpkg's
    status, since installed versions take part in candidate selection). Equal fingerprint => the same
    resolution, so resolved pins are cached under it instead of asking apt on every call."""
    entries: dict[str, list[int]] = {}
    for path in [*sorted(APT_LISTS.glob("*_Packages*")), DPKG_STATUS]:
        try:
            st = path.stat()
        except OSError:
            continue
        entries[path.name] = [st.st_size, st.st_mtime_ns]
    return entries


def extract_deb(deb: Path, dest: Path) -> None:
    """``dpkg-deb -x``: files only, no maintainer scripts (we run what is needed ourselves)."""
    run(["dpkg-deb", "-x", deb, dest], step="extract")


class AptSession:
    """apt queries and downloads for one build; refreshes the lists at most once."""

    def __init__(self, deb_cache: Path) -> None:
        self.deb_cache = deb_cache
        self._updated = False

    def _update_lists(self, reason: str) -> bool:
        if self._updated:
            return False
        if os.geteuid() != 0:
            raise ImageBuildError(
                f"{reason}; apt's package lists look missing or stale and refreshing them needs root: "
                "run `sudo apt-get update` and retry",
                step="apt-update",
            )
        run(["apt-get", "update", "-q"], step="apt-update")
        self._updated = True
        return True

    def _show(self, names: Sequence[str]) -> list[AptRecord]:
        # apt-cache show exits 100 when one name is unknown but still prints the others.
        proc = run(["apt-cache", "show", *names], step="resolve", check=False)
        return parse_apt_show(proc.stdout)

    def resolve(self, roots: Sequence[str], excluded: frozenset[str]) -> list[AptRecord]:
        """Pinned records of the dependency closure of ``roots``, sorted by package name."""
        while True:
            try:
                return self._resolve_once(roots, excluded)
            except ImageBuildError as exc:
                if not self._update_lists(exc.message):
                    raise

    def _resolve_once(self, roots: Sequence[str], excluded: frozenset[str]) -> list[AptRecord]:
        root_records = self._show(roots)
        pins: dict[str, str] = {}
        for root in roots:
            record = pick_downloadable(root_records, root)
            if record is None:
                raise ImageBuildError(f"no downloadable version of Debian package {root!r}", step="resolve")
            pins[root] = record.version
        proc = run(
            ["apt-cache", "depends", *_DEPENDS_FLAGS, *(f"{n}={v}" for n, v in pins.items())], step="resolve"
        )
        closure = dependency_closure(parse_apt_depends(proc.stdout), roots, excluded)
        records = self._show(closure)
        chosen: list[AptRecord] = []
        missing: list[str] = []
        for name in closure:
            record = pick_downloadable(records, name, pins.get(name))
            if record is None:
                missing.append(name)
            else:
                chosen.append(record)
        if missing:
            raise ImageBuildError(f"no downloadable version of: {', '.join(missing)}", step="resolve")
        return chosen

    def download(self, records: Sequence[AptRecord]) -> list[Path]:
        """The .deb of every record, from the cache or ``apt-get download``, sha256-checked."""
        self.deb_cache.mkdir(parents=True, exist_ok=True)
        paths = {r.package: self.deb_cache / deb_file_name(r) for r in records}
        todo = [r for r in records if not _matches(paths[r.package], r.sha256)]
        if todo:
            argv = ["apt-get", "download", "-q", *(f"{r.package}={r.version}" for r in todo)]
            proc = run(argv, step="download", cwd=self.deb_cache, check=False)
            if proc.returncode != 0:
                self._update_lists(f"apt-get download failed: {proc.stderr.strip()[-300:]}")
                run(argv, step="download", cwd=self.deb_cache)
        bad = [r.package for r in records if not _matches(paths[r.package], r.sha256)]
        if bad:
            raise ImageBuildError(
                f"downloaded .deb missing or sha256 mismatch: {', '.join(bad)}", step="download"
            )
        return [paths[r.package] for r in records]


def deb_file_name(record: AptRecord) -> str:
    """The name ``apt-get download`` gives a .deb (the epoch's colon is URL-escaped)."""
    return f"{record.package}_{record.version.replace(':', '%3a')}_{record.architecture}.deb"


def _matches(path: Path, sha256: str | None) -> bool:
    if not path.is_file():
        return False
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return sha256 is None or digest == sha256
