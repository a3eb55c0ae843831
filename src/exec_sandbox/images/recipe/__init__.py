"""The pure half of image building: what goes into an image and the hash that names it.

Nothing here runs a process or touches the network; side effects live in ``debian``, ``kernel``,
``rootfs`` and ``builder``. Every input that can change the bytes of an image feeds one of the
hashes below, so a cached bundle is reused exactly as long as its recipe is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "BOOT_ARGS",
    "EXCLUDED_PACKAGES",
    "KERNEL_PATCHES",
    "LANGUAGES",
    "RECIPE_FORMAT",
    "AptRecord",
    "DependencyGraph",
    "KernelPatch",
    "LanguageSpec",
    "apply_kernel_patch",
    "check_kernel_config",
    "dependency_closure",
    "digest_files",
    "kernel_fragment_text",
    "kernel_recipe_hash",
    "parse_apt_depends",
    "parse_apt_show",
    "parse_kernel_config",
    "pick_downloadable",
    "rootfs_recipe_hash",
]

# Bump when the layout of a bundle changes in a way no hashed input captures.
RECIPE_FORMAT = 1

# tsc_early_khz / lpj / no_timer_check skip TSC calibration against the PIT, which fails under a
# loaded TCG host and stops the boot (see qemu-field-notes.md). reboot=t + QEMU -no-reboot turns the
# guest's `reboot -f` into a QEMU exit, the only clean power-off on microvm without ACPI.
BOOT_ARGS = (
    "console=ttyS0 quiet reboot=t panic=-1 tsc_early_khz=2600000 lpj=10400000 no_timer_check "
    "root=/dev/vda rw init=/sbin/init"
)


@dataclass(frozen=True)
class LanguageSpec:
    """Root Debian packages of one language image (busybox-static is always added)."""

    name: str
    packages: tuple[str, ...]
    description: str


# Every image carries python3 because the guest agent is Python; "raw" is the smallest such image:
# python3-minimal alone lacks json/ctypes/argparse, which the agent imports, so it adds the stdlib
# (libpython3-stdlib) but not the python3/python3.11 packages and their extras.
LANGUAGES: Mapping[str, LanguageSpec] = {
    # bash: the shell E2B's SDK asks for (sbx serve); /bin/sh stays busybox. libc-bin: the C.UTF-8
    # locale (/usr/lib/locale/C.utf8), without which bash warns on every start under LC_ALL=C.UTF-8.
    # pip and curl: what a networked sandbox's code reaches for first (the network is off by default;
    # both honour the proxy variables and trust bundle a networked guest gets)
    "python": LanguageSpec(
        "python",
        ("python3", "python3-pip", "curl", "bash", "libc-bin", "busybox-static"),
        "Debian's python3 + pip + curl + bash + busybox",
    ),
    "javascript": LanguageSpec(
        "javascript",
        ("python3", "nodejs", "bash", "libc-bin", "busybox-static"),
        "Debian's nodejs + python3 + bash + busybox",
    ),
    "raw": LanguageSpec(
        "raw",
        ("python3-minimal", "libpython3-stdlib", "bash", "libc-bin", "busybox-static"),
        "busybox shell + bash + python3-minimal",
    ),
}

# Packages that Depends/PreDepends pull in but that a sandbox never needs at run time: package
# management (no dpkg/apt/debconf in the guest, maintainer scripts never run), perl (only needed
# by those maintainer scripts), coreutils-style tools that busybox replaces, and TLS trust roots
# (networking is off by default; ca-certificates also needs its postinst to be useful). Excluding a
# package also drops everything reachable only through it.
EXCLUDED_PACKAGES: frozenset[str] = frozenset(
    {
        "debconf",
        "cdebconf",
        "debconf-2.0",
        "dpkg",
        "install-info",
        "perl",
        "perl-base",
        "perl-modules-5.36",
        "libperl5.36",
        "tar",
        "coreutils",
        "ca-certificates",
        "openssl",
        "mime-support",
        "sensible-utils",
        "ucf",
        "init-system-helpers",
        "lsb-base",
        "sysvinit-utils",
        "tzdata",
    }
)


@dataclass(frozen=True)
class KernelPatch:
    """One exact source edit applied to linux-source before configuring: ``old`` must occur exactly
    once in ``path`` (relative to the source tree) and becomes ``new``. Exact text, not a diff, so a
    changed kernel source fails the build loudly instead of patching the wrong place."""

    path: str
    old: str
    new: str
    why: str

    def pin(self) -> dict[str, str]:
        return {"path": self.path, "old": self.old, "new": self.new}


# Boot-time cuts that no config option or kernel argument offers (measured under TCG, where the
# guest's time is dominated by translating and re-translating code):
KERNEL_PATCHES: tuple[KernelPatch, ...] = (
    KernelPatch(
        path="arch/x86/mm/init.c",
        old="POISON_FREE_INITMEM, what);",  # free_init_pages(): its call of free_reserved_area()
        new="-1, what);",
        why="Freeing init memory poisons it page by page. Those pages held code that ran during boot, and "
        "TCG treats every store to a page with translated code as self-modifying code: ~0.2 s of "
        "boot for 724 KiB. Unpoisoned, the pages are simply returned to the allocator.",
    ),
    KernelPatch(
        path="arch/x86/kernel/apic/apic.c",
        old="#define LAPIC_CAL_LOOPS		(HZ/10)",
        new="#define LAPIC_CAL_LOOPS		(HZ/50)",
        why="The local-APIC timer is calibrated for LAPIC_CAL_LOOPS jiffies against the TSC, then "
        "verified for as long against the PIT: 2 x 100 ms at HZ/10. Both clocks are the host's under "
        "TCG, so 2 x 20 ms measure as well; the verification still accepts +-2 jiffies. There is no "
        "kernel argument for it, and noapictimer leaves the PIT as the tick (idle guests then cost "
        "~1.9 % of a core instead of ~0.3 %).",
    ),
)


def apply_kernel_patch(text: str, patch: KernelPatch) -> str:
    """``text`` (the contents of ``patch.path``) with the edit applied; ValueError unless ``old``
    occurs exactly once."""
    count = text.count(patch.old)
    if count != 1:
        raise ValueError(f"{patch.path}: expected the patched text exactly once, found it {count} times")
    return text.replace(patch.old, patch.new)


def kernel_fragment_text() -> str:
    """The kernel config fragment merged over ``make tinyconfig`` (shipped beside this module)."""
    return resources.files(__name__).joinpath("kernel-microvm.config").read_text(encoding="utf-8")


_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_kernel_config(text: str) -> dict[str, str]:
    """Map option -> value for a .config or fragment; ``# X is not set`` becomes ``"n"``."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _SET.match(line):
            options[match[1]] = match[2].strip('"')
        elif match := _UNSET.match(line):
            options[match[1]] = "n"
    return options


def check_kernel_config(fragment: str, final_config: str) -> list[str]:
    """Options of ``fragment`` whose value did not survive olddefconfig, as ``OPT: want X, got Y``."""
    final = parse_kernel_config(final_config)
    problems: list[str] = []
    for option, wanted in parse_kernel_config(fragment).items():
        got = final.get(option, "n")
        if got != wanted:
            problems.append(f"{option}: want {wanted}, got {got}")
    return problems


# --- apt output parsing ---------------------------------------------------------------------------


@dataclass
class DependencyGraph:
    """Depends/PreDepends as apt printed them.

    ``depends``: package -> dependency groups; a group lists alternatives (``a | b``) in apt's
    preference order. ``providers``: virtual package -> real packages providing it.
    """

    depends: dict[str, list[list[str]]] = field(default_factory=dict)
    providers: dict[str, list[str]] = field(default_factory=dict)


def parse_apt_depends(output: str) -> DependencyGraph:
    """Parse ``apt-cache depends --recurse`` output (Depends/PreDepends only).

    Format: a package at column 0 (``<name>`` when virtual); ``  Depends: x`` lines; a leading
    ``|`` marks an alternative that continues into the next line; a ``<virtual>`` target is followed
    by its providers, indented by four spaces.
    """
    graph = DependencyGraph()
    current: str | None = None
    pending: list[str] = []
    last_virtual: str | None = None
    for line in output.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not line.startswith(" "):
            if stripped.startswith("<"):
                current = None  # a virtual package header: its providers were listed already
                graph.providers.setdefault(stripped.strip("<>"), [])
            else:
                current = stripped
                graph.depends.setdefault(current, [])
            pending, last_virtual = [], None
            continue
        if current is None:
            continue
        if line.startswith("    ") and ":" not in stripped:
            if last_virtual is not None:
                providers = graph.providers.setdefault(last_virtual, [])
                if stripped not in providers:
                    providers.append(stripped)
            continue
        alternative = stripped.startswith("|")
        kind, _, target = stripped.lstrip("|").partition(":")
        if kind.strip() not in ("Depends", "PreDepends"):
            last_virtual = None
            continue
        target = target.strip()
        name = target.strip("<>")
        last_virtual = name if target.startswith("<") else None
        if last_virtual is not None:
            graph.providers.setdefault(name, [])
        pending.append(name)
        if not alternative:
            graph.depends[current].append(pending)
            pending = []
    return graph


def dependency_closure(
    graph: DependencyGraph, roots: Iterable[str], excluded: Iterable[str] = EXCLUDED_PACKAGES
) -> list[str]:
    """Real packages reachable from ``roots``, skipping excluded ones, sorted by name.

    Of a group of alternatives the first usable one wins (apt's own preference order); a virtual
    package resolves to its first non-excluded provider (and to nothing when all are excluded).
    """
    skip = set(excluded)
    seen: set[str] = set()
    result: set[str] = set()
    stack = list(roots)

    def usable(name: str) -> bool:
        if name in skip:
            return False
        if name in graph.depends:
            return True
        return any(p not in skip for p in graph.providers.get(name, []))

    while stack:
        name = stack.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        if name not in graph.depends and name in graph.providers:
            providers = [p for p in graph.providers[name] if p not in skip]
            if providers:
                stack.append(providers[0])
            continue
        result.add(name)
        for group in graph.depends.get(name, []):
            choice = next((alt for alt in group if usable(alt)), None)
            if choice is not None:
                stack.append(choice)
    return sorted(result)


@dataclass(frozen=True)
class AptRecord:
    """One version of one package as ``apt-cache show`` prints it."""

    package: str
    version: str
    architecture: str
    filename: str | None
    sha256: str | None
    size: int | None
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def downloadable(self) -> bool:
        """Installed-only versions (e.g. from a vendor repo that is gone) have no Filename."""
        return self.filename is not None and self.sha256 is not None

    def pin(self) -> dict[str, Any]:
        """The JSON-able identity of this record that goes into recipe hashes and manifests."""
        return {
            "name": self.package,
            "version": self.version,
            "arch": self.architecture,
            "sha256": self.sha256,
            "filename": self.filename,
        }

    @classmethod
    def from_pin(cls, pin: Mapping[str, Any]) -> AptRecord:
        return cls(
            package=str(pin["name"]),
            version=str(pin["version"]),
            architecture=str(pin["arch"]),
            filename=pin.get("filename"),
            sha256=pin.get("sha256"),
            size=None,
        )


def parse_apt_show(output: str) -> list[AptRecord]:
    """Parse RFC-822 style stanzas of ``apt-cache show`` in the order apt printed them."""
    records: list[AptRecord] = []
    for stanza in re.split(r"\n\s*\n", output.strip()):
        fields: dict[str, str] = {}
        key: str | None = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key is not None:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or "Version" not in fields:
            continue
        size = fields.get("Size")
        records.append(
            AptRecord(
                package=fields["Package"],
                version=fields["Version"],
                architecture=fields.get("Architecture", "all"),
                filename=fields.get("Filename"),
                sha256=fields.get("SHA256"),
                size=int(size) if size and size.isdigit() else None,
                fields=fields,
            )
        )
    return records


def pick_downloadable(
    records: Sequence[AptRecord], package: str, version: str | None = None
) -> AptRecord | None:
    """The version to use: ``version`` if given, else the first downloadable one (apt prints the
    highest first). Installed-only versions are skipped because nothing can download them."""
    for record in records:
        if record.package != package or not record.downloadable:
            continue
        if version is None or record.version == version:
            return record
    return None


# --- hashes ---------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest_files(paths: Iterable[Path], *, root: Path | None = None) -> dict[str, str]:
    """sha256 of each file, keyed by its name (relative to ``root`` when given)."""
    digests: dict[str, str] = {}
    for path in sorted(paths):
        key = str(path.relative_to(root)) if root is not None else path.name
        digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def kernel_recipe_hash(
    *,
    flavor: str,
    source_id: Mapping[str, Any],
    fragment: str,
    scripts: Mapping[str, str],
    patches: Sequence[KernelPatch] = (),
) -> str:
    """Hash of everything that decides the kernel's bytes.

    ``source_id`` identifies the kernel source (linux-source tarball name/size/mtime, or the cloud
    kernel package pins); ``scripts`` maps build-script names to their sha256; ``patches`` are the
    source edits of a compiled kernel (no key at all when there are none, so hashes of recipes
    without patches stay what they were).
    """
    extra: dict[str, Any] = {}
    if patches and flavor == "compiled":
        extra["patches"] = [p.pin() for p in patches]
    return hashlib.sha256(
        _canonical(
            {
                "format": RECIPE_FORMAT,
                "kind": "kernel",
                "flavor": flavor,
                "source": dict(source_id),
                "fragment": fragment if flavor == "compiled" else "",
                "scripts": dict(scripts),
                **extra,
            }
        )
    ).hexdigest()


def rootfs_recipe_hash(
    *,
    language: str,
    packages: Sequence[Mapping[str, Any]],
    scripts: Mapping[str, str],
    guest_files: Mapping[str, str],
    kernel_hash: str,
) -> str:
    """Hash of one language bundle: package pins, build scripts, init + agent files, and the kernel."""
    return hashlib.sha256(
        _canonical(
            {
                "format": RECIPE_FORMAT,
                "kind": "bundle",
                "language": language,
                "packages": sorted((dict(p) for p in packages), key=lambda p: str(p["name"])),
                "scripts": dict(scripts),
                "guest": dict(guest_files),
                "kernel": kernel_hash,
            }
        )
    ).hexdigest()
