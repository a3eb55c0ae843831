"""``packages=`` input, checked before anything runs: requirement strings or a lock. Pure.

Python: PEP 508 requirement strings (``six``, ``attrs>=23``, ``six==1.16.0 --hash=sha256:<hex>``);
no URLs, paths or pip options - a string that starts with ``-`` could otherwise reconfigure the
host's pip (``--index-url``), so it is refused. When every string is an exact pin with a hash the
request *is* a lock: nothing is resolved, each download is checked against its hash.

JavaScript: npm specs ``name``, ``name@range`` or ``@scope/name@range`` from the registry only (no
``file:``, ``git+``, URLs, aliases or paths).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.packages.lock import Ecosystem, LockedPackage, PackageLock

__all__ = ["MAX_PACKAGES", "PackageRequest", "parse_packages"]

MAX_PACKAGES = 64
_MAX_SPEC = 256
_HASH = re.compile(r"^(.*?)\s+--hash=sha256:([0-9a-f]{64})\s*$")
_NPM_NAME = re.compile(r"^(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*$")
_NPM_RANGE = re.compile(r"^[A-Za-z0-9 .^~<>=|*+-]*$")
_ECOSYSTEM: dict[str, Ecosystem] = {"python": "pip", "javascript": "npm"}


@dataclass(frozen=True)
class PackageRequest:
    """A checked ``packages=`` argument: ``specs`` to resolve, or ``lock`` to reproduce."""

    ecosystem: Ecosystem
    specs: tuple[str, ...] = ()
    lock: PackageLock | None = None

    @property
    def names(self) -> list[str]:
        if self.lock is not None:
            return [p.name for p in self.lock.packages if p.requested or self.ecosystem == "pip"]
        return [_spec_name(self.ecosystem, s) for s in self.specs]


def _error(message: str, spec: str | None = None) -> SandboxInputError:
    context: dict[str, object] = {"field": "packages"}
    if spec is not None:
        context["package"] = spec
    return SandboxInputError(message, context=context)


def _spec_name(ecosystem: Ecosystem, spec: str) -> str:
    if ecosystem == "pip":
        return canonicalize_name(Requirement(_HASH.sub(r"\1", spec)).name)
    return spec.rsplit("@", 1)[0] if spec.rfind("@") > 0 else spec


def parse_packages(language: str, packages: Sequence[str] | PackageLock | None) -> PackageRequest | None:
    """Check ``packages`` for ``language``; None when there are none. ``SandboxInputError`` naming
    the field (and the package) otherwise."""
    if packages is None:
        return None
    ecosystem = _ECOSYSTEM.get(language)
    if isinstance(packages, PackageLock):
        if ecosystem != packages.ecosystem:
            raise _error(f"a {packages.ecosystem} lock cannot be installed for language {language!r}")
        return PackageRequest(ecosystem, lock=packages) if packages.packages else None
    if isinstance(packages, str | bytes) or not isinstance(packages, Sequence):
        raise _error("packages must be a list of requirement strings or a PackageLock")
    if not packages:
        return None
    if ecosystem is None:
        raise _error(f"packages are supported for python and javascript, not {language!r}")
    if len(packages) > MAX_PACKAGES:
        raise _error(f"at most {MAX_PACKAGES} packages, got {len(packages)}")
    specs: list[str] = []
    for spec in packages:
        if not isinstance(spec, str):
            raise _error(f"each package must be a string, got {type(spec).__name__}")
        spec = spec.strip()
        if not spec or len(spec) > _MAX_SPEC or any(ch in spec for ch in "\x00\r\n\\"):
            raise _error(f"invalid package spec {spec[:_MAX_SPEC]!r}", spec[:_MAX_SPEC])
        if spec.startswith("-"):
            raise _error(f"package {spec!r}: options are not accepted, only requirements", spec)
        specs.append(_check_pip(spec) if ecosystem == "pip" else _check_npm(spec))
    if ecosystem == "pip":
        names = [_spec_name("pip", s) for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        hashed = [_HASH.match(s) for s in specs]
        if all(hashed) and not dupes:
            return PackageRequest("pip", lock=_pip_lock_from_pins(specs))
    return PackageRequest(ecosystem, specs=tuple(specs))


def _check_pip(spec: str) -> str:
    hashed = _HASH.match(spec)
    body = hashed.group(1) if hashed else spec
    try:
        req = Requirement(body)
    except InvalidRequirement as exc:
        raise _error(f"invalid requirement {spec!r}: {exc}", spec) from exc
    if req.url:
        raise _error(f"package {spec!r}: URLs and paths are not accepted, only index packages", spec)
    if hashed:
        pins = list(req.specifier)
        if len(pins) != 1 or pins[0].operator != "==" or "*" in pins[0].version:
            raise _error(f"package {spec!r}: a --hash needs an exact ==version pin", spec)
    return spec


def _pip_lock_from_pins(specs: list[str]) -> PackageLock:
    locked = []
    for spec in specs:
        hashed = _HASH.match(spec)
        assert hashed is not None
        req = Requirement(hashed.group(1))
        (pin,) = list(req.specifier)
        locked.append(
            LockedPackage(name=canonicalize_name(req.name), version=pin.version, sha256=hashed.group(2),
                          requested=True)
        )
    # The target is filled in when the guest is known (a pin list is valid for any target).
    return PackageLock(ecosystem="pip", target="", packages=tuple(locked))


def _check_npm(spec: str) -> str:
    at = spec.rfind("@")
    name, rng = (spec[:at], spec[at + 1 :]) if at > 0 else (spec, "")
    if not _NPM_NAME.match(name) or len(name) > 214:
        raise _error(f"invalid npm package name in {spec!r}", spec)
    if ":" in rng or "/" in rng or not _NPM_RANGE.match(rng):
        raise _error(f"package {spec!r}: only registry versions/ranges are accepted", spec)
    return spec
