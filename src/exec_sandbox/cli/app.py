"""``sbx``: the click group ``main`` and the ``sbx images`` commands; ``sbx run`` comes from :mod:`.run`."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from exec_sandbox.cli.progress import RichProgress
from exec_sandbox.cli.run import run
from exec_sandbox.errors import SandboxError
from exec_sandbox.images.builder import ImageBuilder
from exec_sandbox.images.manifest import BundleManifest, KernelManifest, read_manifest
from exec_sandbox.images.recipe import LANGUAGES
from exec_sandbox.server.cli import mcp, serve  # import-light: the server loads when a command runs
from exec_sandbox.settings import KernelFlavor, Settings
from exec_sandbox.vm_manager import VmManager
from smartvm.process import pid_alive

__all__ = ["images", "main"]


@click.group()
def main() -> None:
    """exec_sandbox: run untrusted code in microVMs."""


@main.group()
def images() -> None:
    """Build, list and prune guest images."""


@images.command("build")
@click.option(
    "--language",
    "-l",
    "languages",
    multiple=True,
    type=click.Choice(sorted(LANGUAGES)),
    help="Language image to build (repeatable; default: all).",
)
@click.option(
    "--kernel-flavor",
    type=click.Choice(["compiled", "debian-cloud"]),
    default=None,
    help="Kernel to build/use (default: from settings, EXEC_SANDBOX_KERNEL_FLAVOR).",
)
def build(languages: tuple[str, ...], kernel_flavor: KernelFlavor | None) -> None:
    """Build (or verify the cache of) guest images."""
    console = Console(stderr=True)
    progress = RichProgress(console)
    started = time.monotonic()
    try:
        bundles = VmManager(Settings()).build_all(
            languages or None, kernel_flavor=kernel_flavor, progress=progress
        )
    except SandboxError as exc:
        progress.close()
        console.print(f"[red]error:[/] {exc}")
        stderr = getattr(exc, "stderr", None)
        if stderr:
            console.print(stderr[-2000:], markup=False, highlight=False)
        sys.exit(1)
    progress.close()
    for bundle in bundles:
        console.print(f"{bundle.language}: {bundle.rootfs}")
    console.print(f"done in {time.monotonic() - started:.1f}s")


def _scan(images_dir: Path) -> tuple[list[tuple[Path, BundleManifest]], list[tuple[Path, KernelManifest]]]:
    bundles, kernels = [], []
    if images_dir.is_dir():
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if (m := read_manifest(path / "manifest.json", BundleManifest)) is not None:
                bundles.append((path, m))
            elif (k := read_manifest(path / "kernel.json", KernelManifest)) is not None:
                kernels.append((path, k))
    return bundles, kernels


def _current_names(settings: Settings) -> set[str]:
    """Directory names of the bundles the current recipes would use (both kernel flavours)."""
    builder = ImageBuilder(settings, progress=lambda _e: None)
    names: set[str] = set()
    flavors: tuple[KernelFlavor, ...] = ("compiled", "debian-cloud")
    for flavor in flavors:
        try:
            khash = builder.kernel_hash(flavor)
            names.add(f"kernel-{flavor}-{khash[:16]}")
            for language in LANGUAGES:
                names.add(f"{language}-{builder.bundle_hash(language, khash)[:16]}")
        except SandboxError:
            continue  # e.g. no linux-source installed: nothing of that flavour is current
    return names


def _abandoned(path: Path) -> bool:
    """A ``.name.tmp-PID`` / ``.name.old-PID`` directory whose builder process is gone."""
    _, sep, pid = path.name.rpartition("-")
    if not sep or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@images.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_images(as_json: bool) -> None:
    """List cached bundles and whether they match the current recipe."""
    settings = Settings()
    bundles, kernels = _scan(settings.images_dir)
    current = _current_names(settings)
    rows: list[dict[str, Any]] = []
    for path, k in kernels:
        rows.append(
            {
                "name": path.name,
                "kind": "kernel",
                "language": None,
                "kernel_flavor": k.kernel_flavor,
                "recipe_hash": k.recipe_hash,
                "current": path.name in current,
                "size_bytes": _size(path),
                "path": str(path),
            }
        )
    for path, b in bundles:
        rows.append(
            {
                "name": path.name,
                "kind": "bundle",
                "language": b.language,
                "kernel_flavor": b.kernel_flavor,
                "recipe_hash": b.recipe_hash,
                "current": path.name in current,
                "size_bytes": _size(path),
                "path": str(path),
                "rootfs": b.rootfs.path,
                "manifest": str(path / "manifest.json"),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "kind", "flavor", "current", "size")
    for row in rows:
        table.add_row(
            row["name"],
            row["kind"],
            row["kernel_flavor"],
            "yes" if row["current"] else "no",
            f"{row['size_bytes'] / 2**20:.1f} MiB",
        )
    Console().print(table)


@images.command("prune")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
def prune(dry_run: bool) -> None:
    """Remove bundles whose recipe hash is not current (and leftovers of interrupted builds)."""
    settings = Settings()
    current = _current_names(settings)
    bundles, kernels = _scan(settings.images_dir)
    stale = [p for p, _ in [*bundles, *kernels] if p.name not in current]
    if settings.images_dir.is_dir():
        stale += [
            p
            for p in settings.images_dir.iterdir()
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and _abandoned(p)
        ]
    for path in stale:
        click.echo(f"{'would remove' if dry_run else 'removing'} {path}")
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    if not stale:
        click.echo("nothing to prune")

main.add_command(run)
main.add_command(serve)
main.add_command(mcp)
