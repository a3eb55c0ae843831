"""Python packages through the host's own ``pip``: resolve for the guest, then install into a tree.

The host interpreter runs ``python -m pip`` in a subprocess with the caller's environment, so the
user's pip.conf, ``PIP_*`` variables, certificates, find-links and constraints apply - no index is
ever named here. Both steps ask for the GUEST's interpreter and platform (``--python-version``,
``--implementation``, ``--abi``, ``--platform``) and wheels only (``--only-binary=:all:``): sdists
are refused rather than built, because a build would run the package's own code on the host and
its output would be for the host's platform. Steps:

1. resolve: ``pip install --dry-run --ignore-installed --report`` -> every distribution with its
   exact version and sha256 (the :class:`PackageLock`);
2. install: ``pip install --no-deps --require-hashes --target <tree>`` from the pins of that lock,
   so every file pip downloads is checked against the lock's hash. Console scripts are
   retargeted at the guest's python and moved to ``usr/local/bin`` (:mod:`.scripts`); byte code
   is compiled on the host when its Python matches the guest's (``unchecked-hash`` .pyc files,
   valid whatever the file times).

pip's errors are mapped to :class:`PackageResolutionError` (naming the package and pip's reason)
or, for a network failure of the host (pip's ``Retrying ...`` warnings), :class:`PackageFetchError`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exec_sandbox.errors import PackageFetchError, PackageResolutionError, SandboxPermanentError
from exec_sandbox.packages.lock import GuestTarget, LockedPackage, PackageLock
from exec_sandbox.packages.scripts import install_console_scripts
from exec_sandbox.packages.tools import run_package_tool

__all__ = [
    "build_install_argv",
    "build_resolve_argv",
    "classify_pip_failure",
    "install_lock",
    "lock_from_report",
    "requirements_text",
    "resolve",
]

logger = logging.getLogger(__name__)

_NETWORK = re.compile(
    r"Retrying \(Retry\(|connection broken by|Max retries exceeded|NewConnectionError|ConnectTimeoutError"
    r"|ReadTimeoutError|Read timed out|Temporary failure in name resolution|Name or service not known"
    r"|HTTP error 5\d\d|SSLError"
)
_NOT_FOUND = re.compile(r"No matching distribution found for (\S+)")
_NO_VERSION = re.compile(
    r"Could not find a version that satisfies the requirement (\S+) \(from versions: ([^)]*)\)"
)
_CONFLICT = re.compile(r"Cannot install (.+?) because these package versions have conflicting dependencies")
_CAUSE = re.compile(r"The conflict is caused by:\n((?:    .*\n?)+)")
_HASHES = re.compile(r"DO NOT MATCH THE HASHES", re.IGNORECASE)
_HASH_LINE = re.compile(r"^\s+(\S+?)==\S+ from ", re.MULTILINE)


def _target_flags(target: GuestTarget) -> list[str]:
    if target.python_version is None:
        raise SandboxPermanentError(
            "the guest image has no Python to install packages for", context={"field": "packages"}
        )
    return [
        "--only-binary=:all:",
        "--python-version", target.python_version,
        "--implementation", "cp",
        "--abi", target.abi,
        *(arg for platform in target.platforms for arg in ("--platform", platform)),
    ]


def build_resolve_argv(python: str, specs: Sequence[str], target: GuestTarget, report: Path) -> list[str]:
    """``pip install --dry-run ... --report`` for ``specs`` on the guest's platform. Pure."""
    return [
        python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-input",
        "--disable-pip-version-check", "--report", str(report), *_target_flags(target), "--", *specs,
    ]


def build_install_argv(python: str, requirements: Path, target: GuestTarget, into: Path) -> list[str]:
    """``pip install --no-deps --require-hashes --target`` of a lock's pins. Pure."""
    return [
        python, "-m", "pip", "install", "--no-deps", "--require-hashes", "--no-input", "--no-compile",
        "--disable-pip-version-check", "--no-warn-script-location", *_target_flags(target),
        "--target", str(into), "-r", str(requirements),
    ]


def requirements_text(lock: PackageLock) -> str:
    return "".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in lock.packages)


def lock_from_report(report: Mapping[str, Any], target: GuestTarget) -> PackageLock:
    """The lock of a pip installation report (``--report``, format 1). Pure."""
    packages = []
    for item in report.get("install", []):
        meta = item["metadata"]
        archive = item.get("download_info", {}).get("archive_info", {})
        sha = archive.get("hashes", {}).get("sha256")
        if sha is None and str(archive.get("hash", "")).startswith("sha256="):
            sha = archive["hash"].split("=", 1)[1]
        if sha is None:
            raise PackageResolutionError(
                f"pip gave no sha256 for {meta['name']} {meta['version']}; it cannot be verified",
                package=meta["name"], reason="no hash",
            )
        packages.append(LockedPackage(name=_canonical(meta["name"]), version=meta["version"], sha256=sha,
                                      requested=bool(item.get("requested"))))
    packages.sort(key=lambda p: p.name)
    return PackageLock(ecosystem="pip", target=target.label("pip"), packages=tuple(packages))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def classify_pip_failure(
    stderr: str, specs: Sequence[str], target: GuestTarget, stdout: str = ""
) -> Exception:
    """The typed error for a failed pip run (its stderr; stdout holds a conflict's cause). Pure."""
    tail = stderr.strip()[-2000:]
    if _NETWORK.search(stderr):
        return PackageFetchError(
            "the host could not reach its package index (pip's network failed)", stderr=tail
        )
    if _HASHES.search(stderr):
        bad = _HASH_LINE.findall(stderr)
        return PackageResolutionError(
            "a download does not match the hash in the lock (the index serves different bytes)",
            package=bad[0] if bad else ", ".join(specs), reason="hash mismatch", stderr=tail,
        )
    conflict = _CONFLICT.search(stderr)
    if conflict or "ResolutionImpossible" in stderr:
        cause = _CAUSE.search(stdout)
        why = "; ".join(line.strip() for line in cause.group(1).splitlines() if line.strip()) if cause else ""
        return PackageResolutionError(
            f"conflicting requirements: {conflict.group(1) if conflict else ', '.join(specs)}"
            + (f" ({why})" if why else ""),
            package=conflict.group(1) if conflict else ", ".join(specs), reason="conflict", stderr=tail,
        )
    missing = _NO_VERSION.search(stderr)
    if missing or _NOT_FOUND.search(stderr):
        name = missing.group(1) if missing else _NOT_FOUND.search(stderr).group(1)  # type: ignore[union-attr]
        versions = missing.group(2).strip() if missing else ""
        versions = "" if versions == "none" else versions  # pip's word for "no usable version"
        why = (
            f"no wheel of {name} for the guest ({target.label('pip')}); sdists are not built"
            f" (versions with a usable wheel: {versions})"
            if versions
            else f"the index has no such package, or no version of it with a wheel for the guest"
            f" ({target.label('pip')}; sdists are not built)"
        )
        return PackageResolutionError(
            f"cannot install {name}: {why}", package=name, reason="no matching distribution", stderr=tail
        )
    return PackageResolutionError(
        f"pip failed: {tail.splitlines()[-1] if tail else 'no error output'}",
        package=", ".join(specs), reason="pip failed", stderr=tail,
    )


async def resolve(
    specs: Sequence[str], target: GuestTarget, workdir: Path, *, python: str | None = None
) -> PackageLock:
    """Resolve ``specs`` for ``target`` with the host's pip configuration; the lock."""
    report = workdir / "pip-report.json"
    argv = build_resolve_argv(python or sys.executable, specs, target, report)
    result = await run_package_tool(argv, cwd=workdir, what="pip")
    if result.returncode != 0:
        raise classify_pip_failure(result.stderr, specs, target, result.stdout)
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise PackageFetchError(f"pip wrote no usable report: {exc}", stderr=result.stderr[-2000:]) from exc
    return lock_from_report(data, target)


async def install_lock(lock: PackageLock, target: GuestTarget, workdir: Path, tree: Path,
                       *, python: str | None = None) -> Path:
    """Download (hash-checked) and install ``lock`` under ``tree`` at the guest's site-packages path;
    returns that directory."""
    python = python or sys.executable
    site = tree / target.python_site_packages
    site.mkdir(parents=True, mode=0o755)
    requirements = workdir / "requirements.txt"
    requirements.write_text(requirements_text(lock))
    argv = build_install_argv(python, requirements, target, site)
    result = await run_package_tool(argv, cwd=workdir, what="pip")
    if result.returncode != 0:
        raise classify_pip_failure(result.stderr, [p.name for p in lock.packages], target)
    install_console_scripts(site, tree, target.python_interpreter)
    if f"{sys.version_info.major}.{sys.version_info.minor}" == target.python_version:
        await run_package_tool(
            [python, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash", str(site)],
            cwd=workdir, what="compileall",
        )
    return site
