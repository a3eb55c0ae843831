"""The lock: exactly what a ``packages=`` request installed, and the guest it was chosen for. Pure.

A :class:`PackageLock` lists every distribution (requested and transitive) with its exact version
and the digest the host verified (``sha256`` for wheels, npm's ``integrity`` for tarballs). It is
what a result/session reports and what ``packages=`` accepts to reproduce an install: given a lock,
nothing is resolved again and every download is checked against it. :meth:`PackageLock.digest` is
the lock's identity in the L2 layer key.

:class:`GuestTarget` says which interpreter and platform wheels are chosen for: the guest's, read
from the image manifest's Debian package list (``python3.11`` -> CPython 3.11; ``libc6`` 2.36 ->
``manylinux_2_36``), never the host's.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from exec_sandbox.errors import SandboxInputError

__all__ = [
    "Ecosystem",
    "GuestTarget",
    "LockedPackage",
    "PackageLock",
    "ProgressCallback",
    "guest_target",
]

Ecosystem = Literal["pip", "npm"]

#: ``(step, kind, detail)``: kind is ``"start"``, ``"update"`` or ``"done"`` (the CLI maps these onto
#: its image-build progress display; library users may log them).
ProgressCallback = Callable[[str, str, str], None]

_DEB_PYTHON = re.compile(r"^python3\.(\d+)$")
_DEB_VERSION = re.compile(r"^(?:\d+:)?(\d+)\.(\d+)")
_DEB_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class GuestTarget(BaseModel):
    """The guest's interpreter and platform (what wheels and npm packages are chosen for)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str
    python_version: str | None = None  # "3.11"
    glibc: str | None = None  # "2.36"
    node_version: str | None = None  # "18.19"

    @property
    def abi(self) -> str:
        return "cp" + (self.python_version or "").replace(".", "")

    @property
    def platform(self) -> str:
        major, minor = (self.glibc or "2.17").split(".")
        return f"manylinux_{major}_{minor}_{self.arch}"

    @property
    def platforms(self) -> list[str]:
        """Every platform tag the guest's glibc runs, newest first: pip takes ``--platform`` tags
        literally, so a ``manylinux_2_17`` wheel is found only if that tag is asked for too."""
        major, minor = (int(x) for x in (self.glibc or "2.17").split("."))
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        # The pre-PEP 600 names (manylinux2010 and manylinux1 exist for x86 only).
        legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
        x86 = self.arch in ("x86_64", "i686")
        tags += [f"{name}_{self.arch}" for name, m in legacy.items()
                 if m <= minor and (x86 or name == "manylinux2014")]
        return tags

    @property
    def python_site_packages(self) -> str:
        """Where Debian's python3 looks for locally installed packages (on ``sys.path`` with site)."""
        return f"usr/local/lib/python{self.python_version}/dist-packages"

    @property
    def python_interpreter(self) -> str:
        """Debian's python3 of the guest: the interpreter console scripts are retargeted at."""
        return "/usr/bin/python3"

    def label(self, ecosystem: Ecosystem) -> str:
        if ecosystem == "pip":
            return f"{self.abi}-{self.platform}"
        return f"node{self.node_version or '?'}-linux-{self.arch}"


def guest_target(arch: str, deb_packages: Iterable[tuple[str, str]]) -> GuestTarget:
    """The :class:`GuestTarget` of an image from its manifest's ``(name, version)`` Debian packages."""
    python = glibc = node = None
    for name, version in deb_packages:
        match = _DEB_PYTHON.match(name)
        if match:
            python = f"3.{match.group(1)}"
        ver = _DEB_VERSION.match(version)
        if name == "libc6" and ver:
            glibc = f"{ver.group(1)}.{ver.group(2)}"
        elif name == "nodejs" and ver:
            node = f"{ver.group(1)}.{ver.group(2)}"
    return GuestTarget(arch=_DEB_ARCH.get(arch, arch), python_version=python, glibc=glibc, node_version=node)


class LockedPackage(BaseModel):
    """One installed distribution: exact version and the digest its download was verified against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=214)
    version: str = Field(min_length=1, max_length=128)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # pip
    integrity: str | None = Field(default=None, max_length=200)  # npm (SRI, e.g. "sha512-...")
    path: str | None = Field(default=None, max_length=4096)  # npm: where in node_modules
    requested: bool = False

    def pin(self, ecosystem: Ecosystem) -> str:
        if ecosystem == "pip":
            return f"{self.name}=={self.version}" + (f" --hash=sha256:{self.sha256}" if self.sha256 else "")
        return f"{self.name}@{self.version}"


class PackageLock(BaseModel):
    """Everything one ``packages=`` request installed (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ecosystem: Ecosystem
    target: str  # GuestTarget.label(): the interpreter/platform the lock is valid for
    packages: tuple[LockedPackage, ...]
    # npm only: the package-lock.json npm wrote (reproducing a lock replays it with `npm ci`).
    npm_lockfile: str | None = None

    def digest(self) -> str:
        """The lock's identity (what is installed, for which target); part of the L2 layer key."""
        # Which packages were asked for does not change what is installed: not part of the identity.
        body = self.model_dump(
            mode="json", exclude={"npm_lockfile": True, "packages": {"__all__": {"requested"}}}
        )
        body["packages"] = sorted(body["packages"], key=lambda p: (p["path"] or "", p["name"], p["version"]))
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def versions(self) -> dict[str, str]:
        """``{name: version}`` of every installed distribution (npm: the top-level copy of each)."""
        out: dict[str, str] = {}
        for p in self.packages:
            if p.name not in out or p.path == f"node_modules/{p.name}":
                out[p.name] = p.version
        return out

    def pins(self) -> list[str]:
        """Requirement strings that reproduce this lock (pip: with ``--hash``)."""
        return [p.pin(self.ecosystem) for p in self.packages if self.ecosystem == "pip" or p.requested]

    def require_target(self, target: str) -> None:
        if target != self.target:
            raise SandboxInputError(
                f"this lock was made for {self.target}, the guest is {target}",
                context={"field": "packages", "lock_target": self.target, "guest_target": target},
            )
