"""The ``smartvm`` command line: base images and VM lifecycle.

::

    smartvm images pull [--preset lts|hosted] [--manifest PATH | --manifest-url URL]
    smartvm images list | prune
    smartvm validate CONFIG
    smartvm create CONFIG [--id ID] [--vmm firecracker|qemu]
    smartvm start|pause|resume|stop|info ID
    smartvm snapshot ID --snapshot PATH --mem PATH
    smartvm list

Configs are Firecracker-style JSON or TOML files. ``--json`` prints machine-readable
output (errors too). Exit codes: 0 success, 1 a smartvm error, 2 bad usage.
A started VM is owned by a small supervisor process (:mod:`smartvm.supervisor`), so it
keeps running after ``smartvm start`` returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from smartvm.config import VMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.facade import default_data_dir
from smartvm.images import BaseImageBundle, BaseImageManager, ProgressEvent
from smartvm.process import pid_alive
from smartvm.supervisor import VmRecord, control_request, load_record, record_dir, save_record

__all__ = ["cli", "main"]

T = TypeVar("T")
_err = Console(stderr=True)
_out = Console()


class _Ctx:
    def __init__(self, data_dir: Path, as_json: bool) -> None:
        self.data_dir = data_dir
        self.as_json = as_json

    def emit(self, data: Any, human: Callable[[], None] | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        elif human is not None:
            human()
        else:
            _out.print(data)

    def fail(self, exc: SmartVMError) -> NoReturn:
        if self.as_json:
            click.echo(json.dumps({"error": exc.to_dict()}, indent=2))
        else:
            _err.print(f"[bold red]error[/] [{exc.code}] {exc.message}")
            for problem in exc.details.get("errors", []) or []:
                _err.print(f"  - {problem}")
        sys.exit(1)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run(coro)
        except SmartVMError as exc:
            self.fail(exc)


pass_ctx = click.make_pass_decorator(_Ctx)


@click.group()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where VM records, sockets and rootfs copies live (default: $TMPDIR/.smartvm).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, as_json: bool) -> None:
    """smartvm: boot and manage microVMs (Firecracker API; Firecracker or QEMU backend)."""
    ctx.obj = _Ctx((data_dir or default_data_dir()).absolute(), as_json)


# ------------------------------------------------------------------ images


@cli.group()
def images() -> None:
    """Base-image bundles: kernel + rootfs, sha256-verified, LRU-cached."""


def _bundle_row(bundle: BaseImageBundle) -> dict[str, Any]:
    return bundle.model_dump(mode="json")


def _image_manager(
    cache_dir: Path | None, max_stored: int, base_url: str | None, show: bool
) -> BaseImageManager:
    last: dict[str, float] = {}

    def progress(event: ProgressEvent) -> None:
        # One line per artifact phase, throttled: progress without flooding a log.
        key = f"{event.bundle_id}:{getattr(event, 'artifact', '')}:{getattr(event, 'phase', '')}"
        now = time.monotonic()
        if now - last.get(key, 0.0) >= 0.5:
            last[key] = now
            _err.print(f"[dim]{event}[/]")

    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "max_stored_base_images": max_stored}
    if base_url:
        kwargs["lts_base_url"] = base_url
    if show:
        kwargs["progress"] = progress
    return BaseImageManager(**kwargs)


@images.command("pull")
@click.option("--preset", type=click.Choice(["lts", "hosted"]), default=None)
@click.option("--manifest", "manifest_path", type=click.Path(path_type=Path), default=None)
@click.option("--manifest-url", default=None)
@click.option("--ci-version", default=None, help="Firecracker CI version for lts, e.g. v1.16")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option("--max-stored", type=int, default=2, show_default=True)
@click.option("--base-url", default=None, help="Artifact bucket base URL for the lts preset.")
@pass_ctx
def images_pull(
    c: _Ctx,
    preset: str | None,
    manifest_path: Path | None,
    manifest_url: str | None,
    ci_version: str | None,
    cache_dir: Path | None,
    max_stored: int,
    base_url: str | None,
) -> None:
    """Fetch (or verify the cached copy of) a base-image bundle."""
    chosen = preset or ("hosted" if manifest_path or manifest_url else "lts")

    async def go() -> BaseImageBundle:
        manager = _image_manager(cache_dir, max_stored, base_url, show=not c.as_json)
        return await manager.ensure_base_image(
            chosen, manifest_path=manifest_path, manifest_url=manifest_url, ci_version=ci_version
        )

    bundle = c.run(go())
    c.emit(_bundle_row(bundle), lambda: _out.print(f"{bundle.bundle_id}: {bundle.bundle_dir}"))


@images.command("list")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None)
@pass_ctx
def images_list(c: _Ctx, cache_dir: Path | None) -> None:
    """List cached bundles, most recently used first."""
    bundles = c.run(BaseImageManager(cache_dir=cache_dir).list_base_images())

    def human() -> None:
        table = Table("bundle", "preset", "arch", "last used")
        for b in bundles:
            table.add_row(b.bundle_id, b.preset, b.arch, str(b.last_accessed_at))
        _out.print(table)

    c.emit([_bundle_row(b) for b in bundles], human)


@images.command("prune")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option("--max-stored", type=int, default=2, show_default=True)
@click.option("--keep", default=None, help="A bundle id never to evict.")
@pass_ctx
def images_prune(c: _Ctx, cache_dir: Path | None, max_stored: int, keep: str | None) -> None:
    """Evict least-recently-used bundles beyond --max-stored."""

    async def go() -> list[str]:
        manager = BaseImageManager(cache_dir=cache_dir, max_stored_base_images=max_stored)
        return await manager.prune_base_image_cache(keep)

    evicted = c.run(go())
    c.emit({"evicted": evicted}, lambda: _out.print(f"evicted: {', '.join(evicted) or 'nothing'}"))


# ------------------------------------------------------------------ VMs


def _load_config(c: _Ctx, path: Path) -> VMConfig:
    try:
        return VMConfig.from_file(path)
    except SmartVMError as exc:
        c.fail(exc)


@cli.command("validate")
@click.argument("config_path", type=click.Path(path_type=Path, dir_okay=False))
@pass_ctx
def validate_cmd(c: _Ctx, config_path: Path) -> None:
    """Check a VM config; exit 1 listing every problem."""
    result = _load_config(c, config_path).validate()
    if not result.valid:
        c.fail(
            SmartVMError(
                ErrorCode.INVALID_CONFIG, f"{config_path} is not valid", details={"errors": result.errors}
            )
        )
    c.emit({"valid": True, "errors": []}, lambda: _out.print(f"{config_path}: valid"))


@cli.command("create")
@click.argument("config_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--id", "vm_id", default=None, help="VM id (default: the config's id, else generated).")
@click.option("--vmm", type=click.Choice(["firecracker", "qemu"]), default="firecracker", show_default=True)
@click.option("--firecracker-bin", default="firecracker", show_default=True)
@click.option("--qemu-bin", default=None)
@click.option("--accel", type=click.Choice(["kvm", "tcg"]), default=None, help="QEMU: force an accelerator.")
@click.option("--subnet", default="172.16.0.0/24", show_default=True)
@click.option("--bridge", "bridge_name", default="smartvm0", show_default=True)
@pass_ctx
def create_cmd(
    c: _Ctx,
    config_path: Path,
    vm_id: str | None,
    vmm: str,
    firecracker_bin: str,
    qemu_bin: str | None,
    accel: str | None,
    subnet: str,
    bridge_name: str,
) -> None:
    """Register a VM from a config file (validated now, booted by `start`)."""
    vm_config = _load_config(c, config_path)
    result = vm_config.validate()
    if not result.valid:
        c.fail(
            SmartVMError(
                ErrorCode.INVALID_CONFIG, f"{config_path} is not valid", details={"errors": result.errors}
            )
        )
    resolved = vm_id or vm_config.id or f"vm-{os.urandom(6).hex()}"
    if (record_dir(c.data_dir, resolved) / "record.json").exists():
        c.fail(SmartVMError(ErrorCode.VM_ALREADY_EXISTS, f"a VM with id {resolved!r} already exists"))
    if not os.path.isabs(firecracker_bin) and os.sep in firecracker_bin:
        firecracker_bin = str(Path(firecracker_bin).absolute())
    record = VmRecord(
        id=resolved,
        vmm=vmm,
        config=vm_config.to_dict(),
        firecracker_binary_path=firecracker_bin,
        qemu_binary_path=qemu_bin,
        accel=accel,
        subnet=subnet,
        bridge_name=bridge_name,
    )
    save_record(c.data_dir, record)
    c.emit(record.model_dump(mode="json"), lambda: _out.print(f"created {resolved}"))


def _record_or_fail(c: _Ctx, vm_id: str) -> VmRecord:
    try:
        return load_record(c.data_dir, vm_id)
    except SmartVMError as exc:
        c.fail(exc)


@cli.command("start")
@click.argument("vm_id")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for boot.")
@pass_ctx
def start_cmd(c: _Ctx, vm_id: str, timeout: float) -> None:
    """Boot a created VM; it keeps running after this command returns."""
    record = _record_or_fail(c, vm_id)
    if record.state in ("running", "paused") and record.supervisor_pid and pid_alive(record.supervisor_pid):
        c.emit(record.model_dump(mode="json"), lambda: _out.print(f"{vm_id} is already {record.state}"))
        return
    record = record.model_copy(update={"state": "starting", "error": None})
    save_record(c.data_dir, record)
    directory = record_dir(c.data_dir, vm_id)
    log_flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(directory / "supervisor.log", log_flags, 0o600), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smartvm.supervisor", vm_id, "--data-dir", str(c.data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = load_record(c.data_dir, vm_id)
        if record.state in ("running", "paused"):
            c.emit(record.model_dump(mode="json"), lambda: _out.print(f"{vm_id} is running"))
            return
        if record.state == "error" or proc.poll() is not None:
            c.fail(
                SmartVMError(
                    ErrorCode.VMM_START_FAILED,
                    f"VM {vm_id!r} failed to start: {record.error or _tail(directory / 'supervisor.log')}",
                )
            )
        time.sleep(0.05)
    proc.terminate()
    c.fail(SmartVMError(ErrorCode.VMM_START_FAILED, f"VM {vm_id!r} did not start within {timeout}s"))


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _control(c: _Ctx, vm_id: str, request: dict[str, Any], timeout: float = 120.0) -> Any:
    _record_or_fail(c, vm_id)
    return c.run(control_request(c.data_dir, vm_id, request, timeout))


@cli.command("pause")
@click.argument("vm_id")
@pass_ctx
def pause_cmd(c: _Ctx, vm_id: str) -> None:
    """Pause a running VM."""
    result = _control(c, vm_id, {"op": "pause"})
    c.emit(result, lambda: _out.print(f"{vm_id} is {result['state']}"))


@cli.command("resume")
@click.argument("vm_id")
@pass_ctx
def resume_cmd(c: _Ctx, vm_id: str) -> None:
    """Resume a paused VM."""
    result = _control(c, vm_id, {"op": "resume"})
    c.emit(result, lambda: _out.print(f"{vm_id} is {result['state']}"))


@cli.command("snapshot")
@click.argument("vm_id")
@click.option("--snapshot", "snapshot_path", type=click.Path(path_type=Path), required=True)
@click.option("--mem", "mem_file_path", type=click.Path(path_type=Path), required=True)
@pass_ctx
def snapshot_cmd(c: _Ctx, vm_id: str, snapshot_path: Path, mem_file_path: Path) -> None:
    """Snapshot a paused VM (state + memory files)."""
    result = _control(
        c,
        vm_id,
        {
            "op": "snapshot",
            "snapshot_path": str(snapshot_path.absolute()),
            "mem_file_path": str(mem_file_path.absolute()),
        },
    )
    c.emit(result, lambda: _out.print(f"snapshot written: {result['snapshot_path']}"))


@cli.command("info")
@click.argument("vm_id")
@pass_ctx
def info_cmd(c: _Ctx, vm_id: str) -> None:
    """Show what the VMM reports about a running VM."""
    record = _record_or_fail(c, vm_id)
    if record.state not in ("running", "paused"):
        c.emit(record.model_dump(mode="json"), lambda: _out.print(f"{vm_id}: {record.state}"))
        return
    result = _control(c, vm_id, {"op": "info"})
    c.emit(result, lambda: _out.print(result))


@cli.command("stop")
@click.argument("vm_id")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@pass_ctx
def stop_cmd(c: _Ctx, vm_id: str, timeout: float) -> None:
    """Stop a VM and free everything it holds (idempotent)."""
    record = _record_or_fail(c, vm_id)
    if record.supervisor_pid and pid_alive(record.supervisor_pid):
        try:
            c.run(control_request(c.data_dir, vm_id, {"op": "stop"}, timeout))
        except SystemExit:
            os.kill(record.supervisor_pid, 15)
        deadline = time.monotonic() + timeout
        while pid_alive(record.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    record = load_record(c.data_dir, vm_id)
    if record.state != "stopped":
        record = record.model_copy(update={"state": "stopped", "supervisor_pid": None, "vmm_pid": None})
        save_record(c.data_dir, record)
    c.emit(record.model_dump(mode="json"), lambda: _out.print(f"{vm_id} is stopped"))


@cli.command("rm")
@click.argument("vm_id")
@pass_ctx
def rm_cmd(c: _Ctx, vm_id: str) -> None:
    """Forget a stopped VM's record."""
    record = _record_or_fail(c, vm_id)
    if record.supervisor_pid and pid_alive(record.supervisor_pid):
        c.fail(SmartVMError(ErrorCode.INVALID_STATE, f"VM {vm_id!r} is {record.state}; stop it first"))
    directory = record_dir(c.data_dir, vm_id)
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    c.emit({"removed": vm_id}, lambda: _out.print(f"removed {vm_id}"))


@cli.command("list")
@pass_ctx
def list_cmd(c: _Ctx) -> None:
    """List the VMs this data dir knows."""
    root = c.data_dir / "cli"
    records = []
    for path in sorted(root.glob("*/record.json")) if root.exists() else []:
        record = load_record(c.data_dir, path.parent.name)
        if record.state in ("running", "paused") and not (
            record.supervisor_pid and pid_alive(record.supervisor_pid)
        ):
            record = record.model_copy(update={"state": "stopped"})  # its supervisor died
        records.append(record)

    def human() -> None:
        table = Table("id", "vmm", "state", "pid")
        for r in records:
            table.add_row(r.id, r.vmm, r.state, str(r.vmm_pid or ""))
        _out.print(table)

    c.emit([{"id": r.id, "vmm": r.vmm, "state": r.state, "pid": r.vmm_pid} for r in records], human)


def main() -> None:
    cli(prog_name="smartvm")


if __name__ == "__main__":
    main()
