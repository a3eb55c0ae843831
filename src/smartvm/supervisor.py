"""A per-VM supervisor process, so CLI-started VMs outlive the CLI command that started them.

The VMM dies with its owner (parent-death signal), so something must own it. ``smartvm
start ID`` spawns ``python -m smartvm.supervisor`` in its own session; it boots the VM
through :class:`~smartvm.facade.SmartVM` and serves a tiny JSON-lines control protocol on
``<record dir>/control.sock``::

    -> {"op": "info" | "pause" | "resume" | "stop" | "snapshot", ...}
    <- {"ok": true, "result": {...}}   or   {"ok": false, "error": {"code": ..., "message": ...}}

The VM record (``record.json``) is the CLI's source of truth; the supervisor updates its
``state`` and ``pid``. When the VM stops (asked, or the guest powered off), the supervisor
cleans up every host change and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.hostfs import atomic_write_file, ensure_private_dir

__all__ = ["VmRecord", "control_request", "load_record", "record_dir", "save_record"]

_log = logging.getLogger("smartvm.supervisor")
MAX_CONTROL_LINE = 1 << 20


class VmRecord(BaseModel):
    """What the CLI knows about a VM it created."""

    model_config = ConfigDict(extra="forbid")

    id: str
    vmm: str
    config: dict[str, Any]
    firecracker_binary_path: str = "firecracker"
    qemu_binary_path: str | None = None
    accel: str | None = None
    subnet: str = "172.16.0.0/24"
    bridge_name: str = "smartvm0"
    state: str = "created"
    supervisor_pid: int | None = None
    vmm_pid: int | None = None
    error: str | None = None


def record_dir(data_dir: Path, vm_id: str) -> Path:
    return data_dir / "cli" / vm_id


def load_record(data_dir: Path, vm_id: str) -> VmRecord:
    path = record_dir(data_dir, vm_id) / "record.json"
    try:
        return VmRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise SmartVMError(
            ErrorCode.VM_NOT_FOUND, f"no VM with id {vm_id!r} under {data_dir}", details={"vm_id": vm_id}
        ) from None
    except ValueError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_CONFIG, f"VM record {path} is corrupt: {exc}", details={"path": str(path)}
        ) from exc


def save_record(data_dir: Path, record: VmRecord) -> None:
    directory = ensure_private_dir(record_dir(data_dir, record.id))
    atomic_write_file(directory / "record.json", (record.model_dump_json(indent=2) + "\n").encode())


async def control_request(data_dir: Path, vm_id: str, request: dict[str, Any], timeout: float) -> Any:
    """Send one request to a VM's supervisor and return its result (raising its error)."""
    sock = record_dir(data_dir, vm_id) / "control.sock"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(sock), limit=MAX_CONTROL_LINE)
    except (OSError, TimeoutError) as exc:
        raise SmartVMError(
            ErrorCode.NO_CLIENT,
            f"VM {vm_id!r} has no running supervisor ({sock}): {exc}",
            details={"vm_id": vm_id},
        ) from exc
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(timeout):
            line = await reader.readline()
    except TimeoutError as exc:
        raise SmartVMError(ErrorCode.API_TIMEOUT, f"VM {vm_id!r} did not answer within {timeout}s") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line:
        raise SmartVMError(ErrorCode.NO_CLIENT, f"VM {vm_id!r}'s supervisor closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise SmartVMError(
            err.get("code", ErrorCode.API_ERROR),
            err.get("message", "unknown error"),
            status_code=err.get("status_code"),
            fault_message=err.get("fault_message"),
        )
    return reply.get("result")


class _Supervisor:
    def __init__(self, data_dir: Path, vm_id: str) -> None:
        from smartvm.facade import SmartVM

        self.data_dir = data_dir
        self.record = load_record(data_dir, vm_id)
        self.smartvm = SmartVM(
            data_dir=data_dir,
            vmm="qemu" if self.record.vmm == "qemu" else "firecracker",
            firecracker_binary_path=self.record.firecracker_binary_path,
            qemu_binary_path=self.record.qemu_binary_path,
            accel=self.record.accel,
            subnet=self.record.subnet,
            bridge_name=self.record.bridge_name,
        )
        self.done = asyncio.Event()

    def _update(self, **fields: Any) -> None:
        self.record = self.record.model_copy(update=fields)
        save_record(self.data_dir, self.record)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.done.set)
        sock = record_dir(self.data_dir, self.record.id) / "control.sock"
        sock.unlink(missing_ok=True)
        try:
            vm = await self.smartvm.create_vm(self.record.config, vm_id=self.record.id)
            await vm.start()
        except SmartVMError as exc:
            self._update(state="error", error=str(exc), supervisor_pid=None)
            await self.smartvm.cleanup()
            return 1
        server = await asyncio.start_unix_server(self._serve, path=str(sock), limit=MAX_CONTROL_LINE)
        self._update(state=vm.state.value, supervisor_pid=os.getpid(), vmm_pid=vm.pid, error=None)
        exited = asyncio.create_task(vm.wait())
        stop_asked = asyncio.create_task(self.done.wait())
        await asyncio.wait({exited, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
        server.close()
        sock.unlink(missing_ok=True)
        try:
            await self.smartvm.cleanup()
        finally:
            for task in (exited, stop_asked):
                task.cancel()
            self._update(state="stopped", supervisor_pid=None, vmm_pid=None)
        return 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line or b"{}")
            reply: dict[str, Any] = {"ok": True, "result": await self._handle(request)}
        except SmartVMError as exc:
            reply = {"ok": False, "error": exc.to_dict()}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "error": {"code": "INVALID_ARGUMENT", "message": str(exc)}}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def _handle(self, request: dict[str, Any]) -> Any:
        vm = self.smartvm.require_vm(self.record.id)
        op = request.get("op")
        if op == "info":
            info = await vm.get_info()
            return {
                "id": vm.id,
                "state": vm.state.value,
                "vmm": info.vmm,
                "vmm_state": info.state.value,
                "vmm_version": info.vmm_version,
                "pid": info.pid,
                "accelerator": info.accelerator,
            }
        if op == "pause":
            await vm.pause()
        elif op == "resume":
            await vm.resume()
        elif op == "snapshot":
            files = await vm.snapshot(request["snapshot_path"], request["mem_file_path"])
            self._update(state=vm.state.value)
            return {"snapshot_path": str(files.snapshot_path), "mem_file_path": str(files.mem_file_path)}
        elif op == "stop":
            self.done.set()
            return {"id": vm.id, "state": "stopping"}
        else:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"unknown control operation {op!r}")
        self._update(state=vm.state.value)
        return {"id": vm.id, "state": vm.state.value}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smartvm-supervisor")
    parser.add_argument("vm_id")
    parser.add_argument("--data-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_Supervisor(args.data_dir, args.vm_id).run())


if __name__ == "__main__":
    sys.exit(main())
