"""JavaScript packages through the host's own ``npm`` (the user's npmrc: registry, mirrors, auth,
certificates - no registry is ever named here).

1. resolve: a scratch ``package.json`` with the requested specs, ``npm install --package-lock-only
   --ignore-scripts`` -> ``package-lock.json``: every package with its exact version and integrity
   (the :class:`PackageLock`; the lockfile itself rides along in ``npm_lockfile``);
2. install: ``npm ci --ignore-scripts`` from that lockfile into ``<tree>/home/sandbox/node_modules``
   (the session's working directory); npm checks every tarball against the lock's integrity.

No package script ever runs on the host. A package that declares install scripts (a native
build, ``node-gyp``) is refused with :class:`PackageResolutionError`: without its build it would
not work in the guest. npm's errors map to :class:`PackageResolutionError` (``E404`` unknown
package, ``ETARGET`` no such version, ``ERESOLVE`` conflict) or :class:`PackageFetchError`
(the host's network).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exec_sandbox.errors import PackageFetchError, PackageResolutionError
from exec_sandbox.packages.lock import GuestTarget, LockedPackage, PackageLock
from exec_sandbox.packages.tools import run_package_tool

__all__ = [
    "GUEST_NODE_MODULES",
    "build_ci_argv",
    "build_lock_argv",
    "classify_npm_failure",
    "install_lock",
    "lock_from_lockfile",
    "manifest_for",
    "resolve",
]

#: Where the packages land in the guest (the agent's working directory is /home/sandbox).
GUEST_NODE_MODULES = "home/sandbox/node_modules"

_QUIET = ["--ignore-scripts", "--no-audit", "--no-fund", "--no-update-notifier", "--loglevel=error"]
_NETWORK = re.compile(r"\b(ECONNREFUSED|ENOTFOUND|ETIMEDOUT|EAI_AGAIN|ECONNRESET|EPIPE|E5\d\d|ERR_SOCKET)\b")
_E404 = re.compile(r"404 Not Found - GET \S+?/((?:@[^/\s]+(?:/|%2f))?[^/\s]+) - ", re.IGNORECASE)
_ETARGET = re.compile(r"No matching version found for (\S+?)\.?$", re.MULTILINE)


def _split(spec: str) -> tuple[str, str]:
    at = spec.rfind("@")
    return (spec[:at], spec[at + 1 :] or "*") if at > 0 else (spec, "*")


def manifest_for(dependencies: Mapping[str, str]) -> str:
    """The scratch ``package.json``. Pure."""
    return json.dumps({"name": "sbx-packages", "version": "0.0.0", "private": True,
                       "dependencies": dict(dependencies)}, indent=1)


def build_lock_argv(npm: str) -> list[str]:
    return [npm, "install", "--package-lock-only", "--lockfile-version=3", *_QUIET]


def build_ci_argv(npm: str) -> list[str]:
    return [npm, "ci", "--omit=dev", *_QUIET]


def lock_from_lockfile(text: str, requested: Sequence[str], target: GuestTarget) -> PackageLock:
    """The lock of an npm ``package-lock.json`` (v2/v3); refuses packages with install scripts. Pure."""
    data: dict[str, Any] = json.loads(text)
    locked = []
    for path, entry in sorted(data.get("packages", {}).items()):
        if not path:
            continue
        name = entry.get("name") or path.rsplit("node_modules/", 1)[-1]
        if entry.get("hasInstallScript"):
            raise PackageResolutionError(
                f"npm package {name} needs install scripts (a native build), which are never run;"
                " it cannot be installed", package=name, reason="install scripts",
            )
        if entry.get("link") or "version" not in entry:
            raise PackageResolutionError(f"npm package {name} is not a registry package", package=name,
                                         reason="not a registry package")
        locked.append(LockedPackage(
            name=name, version=entry["version"], integrity=entry.get("integrity"), path=path,
            requested=path == f"node_modules/{name}" and name in requested,
        ))
    return PackageLock(ecosystem="npm", target=target.label("npm"), packages=tuple(locked), npm_lockfile=text)


def classify_npm_failure(stderr: str, specs: Sequence[str]) -> Exception:
    """The typed error for a failed npm run. Pure."""
    tail = stderr.strip()[-2000:]
    missing = _E404.search(stderr)
    if missing:
        name = missing.group(1).replace("%2f", "/").replace("%2F", "/")
        return PackageResolutionError(f"npm package {name} does not exist in the registry", package=name,
                                      reason="not found", stderr=tail)
    version = _ETARGET.search(stderr)
    if version or "ETARGET" in stderr:
        what = version.group(1) if version else ", ".join(specs)
        return PackageResolutionError(f"no version of {what} matches", package=what, reason="no such version",
                                      stderr=tail)
    if "ERESOLVE" in stderr:
        return PackageResolutionError(f"conflicting npm requirements: {', '.join(specs)}",
                                      package=", ".join(specs), reason="conflict", stderr=tail)
    if "EINTEGRITY" in stderr:
        return PackageResolutionError("a tarball does not match the lock's integrity",
                                      package=", ".join(specs),
                                      reason="hash mismatch", stderr=tail)
    if _NETWORK.search(stderr):
        return PackageFetchError("the host could not reach its npm registry", stderr=tail)
    return PackageResolutionError(f"npm failed: {tail.splitlines()[-1] if tail else 'no error output'}",
                                  package=", ".join(specs), reason="npm failed", stderr=tail)


async def resolve(
    specs: Sequence[str], target: GuestTarget, workdir: Path, *, npm: str = "npm"
) -> PackageLock:
    """Resolve ``specs`` with the host's npm configuration; the lock (with npm's lockfile)."""
    scratch = workdir / "npm-resolve"
    scratch.mkdir(mode=0o700)
    deps = dict(_split(s) for s in specs)
    (scratch / "package.json").write_text(manifest_for(deps))
    result = await run_package_tool(build_lock_argv(npm), cwd=scratch, what="npm")
    if result.returncode != 0:
        raise classify_npm_failure(result.stderr, specs)
    return lock_from_lockfile((scratch / "package-lock.json").read_text(), list(deps), target)


async def install_lock(lock: PackageLock, workdir: Path, tree: Path, *, npm: str = "npm") -> Path:
    """Install ``lock`` (integrity-checked by npm) under ``tree``; returns its node_modules."""
    if lock.npm_lockfile is None:
        raise PackageResolutionError("an npm lock needs its npm_lockfile to be reproduced",
                                     package=", ".join(lock.versions()), reason="incomplete lock")
    home = tree / GUEST_NODE_MODULES.rsplit("/", 1)[0]
    home.mkdir(parents=True, mode=0o755)
    # package.json must say what the lockfile's root says, or `npm ci` refuses them as out of sync.
    top = json.loads(lock.npm_lockfile).get("packages", {}).get("", {}).get("dependencies", {})
    (home / "package.json").write_text(manifest_for(top))
    (home / "package-lock.json").write_text(lock.npm_lockfile)
    result = await run_package_tool(build_ci_argv(npm), cwd=home, what="npm")
    if result.returncode != 0:
        raise classify_npm_failure(result.stderr, list(top))
    for name in ("package.json", "package-lock.json"):
        (home / name).unlink()
    modules = tree / GUEST_NODE_MODULES
    if not modules.is_dir():
        modules.mkdir(mode=0o755)
    shutil.rmtree(modules / ".bin", ignore_errors=True)  # host-made symlinks to scripts, unused here
    return modules
