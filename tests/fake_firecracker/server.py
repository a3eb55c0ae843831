#!/usr/bin/env python3
"""A fake Firecracker: serves Firecracker 1.16.1's API on ``--api-sock`` with only the stdlib.

It enforces what the real VMM enforces and that our client could get wrong:
every request body is checked against the OpenAPI spec (unknown fields rejected),
pre-boot-only resources are refused after ``InstanceStart`` and post-boot-only
ones before it, ``InstanceStart`` runs once, ``/snapshot/create`` needs a paused
VM, ``/snapshot/load`` needs a fresh process, path ids must equal body ids and
match ``[A-Za-z0-9_]+``, and files the real VMM would open must exist. Errors are
HTTP 400 ``{"fault_message": ...}``. Every response it sends is itself validated
against the spec (a violation is a bug in the fake and answered with 500).

Test knobs: ``--delay-socket S`` (bind late), ``--exit-code C`` (exit before binding,
or after ``--exit-after-requests N`` answered requests), ``--request-delay S``,
``--pid-file P`` (so tests can check the process is gone), ``--ignore-sigterm``;
``FAKE_FIRECRACKER_VERSION`` changes the reported version.
``SendCtrlAltDel`` makes it exit 0, like a guest rebooting with ``reboot=k``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import signal
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.fc_spec import SpecViolation, load_spec, match_path, validate_request, validate_response

__all__ = ["FakeFirecracker", "main"]

VERSION = os.environ.get("FAKE_FIRECRACKER_VERSION", "1.16.1")
ID_RE = re.compile(r"^[A-Za-z0-9_]+$")
SNAPSHOT_MAGIC = "fake-firecracker-snapshot-v1"

# Resources configurable only before InstanceStart (method, spec path template).
PRE_BOOT = {
    ("PUT", "/boot-source"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/cpu-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/mmds/config"),
    ("PUT", "/entropy"),
    ("PUT", "/serial"),
    ("PUT", "/balloon"),
    ("PUT", "/pmem/{id}"),
    ("PUT", "/hotplug/memory"),
}
POST_BOOT = {
    ("PATCH", "/vm"),
    ("PUT", "/snapshot/create"),
    ("PATCH", "/drives/{drive_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PATCH", "/balloon"),
}
NOT_CONFIGURATION = {"/actions", "/snapshot/load", "/snapshot/create", "/vm"}
# Firecracker accepts these on a fresh process before /snapshot/load.
LOAD_COMPATIBLE = {"/logger", "/metrics"}


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FakeFirecracker:
    """The VMM state machine, independent of HTTP."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.lock = threading.Lock()
        self.started = False
        self.paused = False
        self.configured: set[str] = set()  # spec templates configured so far
        self.boot_source: dict[str, Any] | None = None
        self.machine_config: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False}
        self.drives: dict[str, dict[str, Any]] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.other: dict[str, Any] = {}
        self.exit_requested = False

    @property
    def state(self) -> str:
        if not self.started:
            return "Not started"
        return "Paused" if self.paused else "Running"

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        matched = match_path(path)
        if matched is None:
            raise ApiError(f"Invalid request method and/or path: {method} {path}.")
        template, params = matched
        try:
            validate_request(method, path, body)
        except SpecViolation as exc:
            raise ApiError(f"An error occurred when deserializing the json body of a request: {exc}") from exc
        key = (method, template)
        if key in PRE_BOOT and self.started:
            raise ApiError(f"The requested operation is not supported after starting the microVM: {key}")
        if key in POST_BOOT and not self.started:
            raise ApiError(f"The requested operation is not supported before starting the microVM: {key}")
        for name, value in params.items():
            if not ID_RE.match(value):
                raise ApiError(f"Invalid {name} {value!r}: must match [A-Za-z0-9_]+")
            if isinstance(body, dict) and name in body and body[name] != value:
                raise ApiError(f"The id from the path {value!r} does not match the body's {body[name]!r}")
        handler = getattr(self, f"_{method.lower()}_{_slug(template)}", None)
        if handler is None:
            raise ApiError(f"{method} {template} is not implemented by the fake Firecracker", status=400)
        result: tuple[int, Any] = handler(body, params)
        if method in ("PUT", "PATCH") and template not in NOT_CONFIGURATION:
            self.configured.add(template)
        return result

    # ---- info

    def _get_root(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, {
            "app_name": "Firecracker",
            "id": self.instance_id,
            "state": self.state,
            "vmm_version": VERSION,
        }

    def _get_version(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, {"firecracker_version": VERSION}

    def _get_machine_config(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.machine_config

    def _get_vm_config(self, body: Any, params: dict[str, str]) -> tuple[int, Any]:
        out: dict[str, Any] = {
            "machine-config": self.machine_config,
            "drives": list(self.drives.values()),
            "network-interfaces": list(self.ifaces.values()),
        }
        if self.boot_source is not None:
            out["boot-source"] = self.boot_source
        if self.vsock is not None:
            out["vsock"] = self.vsock
        return 200, out

    # ---- pre-boot configuration

    def _put_boot_source(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        _must_exist(body["kernel_image_path"], "kernel")
        if body.get("initrd_path"):
            _must_exist(body["initrd_path"], "initrd")
        self.boot_source = body
        return 204, None

    def _put_machine_config(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if not 1 <= body["vcpu_count"] <= 32:
            raise ApiError(f"Invalid vCPU count {body['vcpu_count']}: must be between 1 and 32")
        if body["mem_size_mib"] < 1:
            raise ApiError("The memory size (MiB) is invalid")
        self.machine_config = body
        return 204, None

    def _patch_machine_config(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        return self._put_machine_config({**self.machine_config, **body}, params)

    def _put_drives_drive_id(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if body.get("path_on_host") is not None:
            _must_exist(body["path_on_host"], f"drive {body['drive_id']}")
        if body.get("is_root_device") and any(
            d.get("is_root_device") and i != body["drive_id"] for i, d in self.drives.items()
        ):
            raise ApiError("A root block device already exists")
        self.drives[body["drive_id"]] = body
        return 204, None

    def _put_network_interfaces_iface_id(
        self, body: dict[str, Any], params: dict[str, str]
    ) -> tuple[int, Any]:
        for other_id, other in self.ifaces.items():
            if other_id != body["iface_id"] and other["host_dev_name"] == body["host_dev_name"]:
                raise ApiError(f"The host device name {body['host_dev_name']} is already in use")
        self.ifaces[body["iface_id"]] = body
        return 204, None

    def _put_vsock(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if body["guest_cid"] < 3:
            raise ApiError(f"Invalid guest CID {body['guest_cid']}: must be >= 3")
        self.vsock = body
        return 204, None

    def _put_logger(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if body.get("log_path"):
            _must_exist(body["log_path"], "log file")
        self.other["logger"] = body
        return 204, None

    def _put_metrics(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        _must_exist(body["metrics_path"], "metrics file")
        self.other["metrics"] = body
        return 204, None

    def _simple(self, name: str) -> Any:
        def put(body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
            self.other[name] = body
            return 204, None

        return put

    def __getattr__(self, item: str) -> Any:
        simple = {
            "_put_mmds_config": "mmds-config",
            "_put_entropy": "entropy",
            "_put_serial": "serial",
            "_put_balloon": "balloon",
            "_put_cpu_config": "cpu-config",
            "_put_mmds": "mmds",
            "_patch_mmds": "mmds",
            "_put_hotplug_memory": "hotplug-memory",
        }
        if item in simple:
            return self._simple(simple[item])
        raise AttributeError(item)

    # ---- actions and post-boot

    def _put_actions(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.started:
                raise ApiError("The microVM is already running: InstanceStart is allowed only once")
            if self.boot_source is None:
                raise ApiError("Cannot start microvm without kernel configuration.")
            self.started = True
            return 204, None
        if not self.started:
            raise ApiError(f"{action} is not supported before starting the microVM")
        if action == "SendCtrlAltDel":
            self.exit_requested = True
        return 204, None

    def _patch_vm(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        self.paused = body["state"] == "Paused"
        return 204, None

    def _put_snapshot_create(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if not self.paused:
            raise ApiError("Cannot create a snapshot: the microVM is not paused (state Running)")
        if body.get("snapshot_type", "Full") == "Diff":
            raise ApiError("Diff snapshots require track_dirty_pages to be enabled in machine-config")
        state = {
            "magic": SNAPSHOT_MAGIC,
            "machine_config": self.machine_config,
            "drives": self.drives,
            "ifaces": self.ifaces,
            "vsock": self.vsock,
        }
        try:
            Path(body["snapshot_path"]).write_text(json.dumps(state))
            with open(body["mem_file_path"], "wb") as fh:
                fh.truncate(self.machine_config["mem_size_mib"] * 1024 * 1024)
        except OSError as exc:
            raise ApiError(f"Cannot create snapshot: {exc}") from exc
        return 204, None

    def _put_snapshot_load(self, body: dict[str, Any], params: dict[str, str]) -> tuple[int, Any]:
        if self.started or self.configured - LOAD_COMPATIBLE:
            raise ApiError(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        if ("mem_file_path" in body) == ("mem_backend" in body):
            raise ApiError("Exactly one of mem_file_path and mem_backend must be present")
        mem_path = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
        _must_exist(mem_path, "memory file")
        try:
            state = json.loads(Path(body["snapshot_path"]).read_text())
        except (OSError, ValueError) as exc:
            raise ApiError(f"Cannot load snapshot state file: {exc}") from exc
        if not isinstance(state, dict) or state.get("magic") != SNAPSHOT_MAGIC:
            raise ApiError("Cannot load snapshot state file: invalid snapshot format")
        ifaces: dict[str, dict[str, Any]] = state["ifaces"]
        for override in body.get("network_overrides", []):
            if override["iface_id"] not in ifaces:
                raise ApiError(f"Network override for unknown interface {override['iface_id']!r}")
            ifaces[override["iface_id"]]["host_dev_name"] = override["host_dev_name"]
        vsock = state["vsock"]
        if "vsock_override" in body:
            if vsock is None:
                raise ApiError("Vsock override given but the snapshot has no vsock device")
            vsock = {**vsock, "uds_path": body["vsock_override"]["uds_path"]}
        self.machine_config = state["machine_config"]
        self.drives = state["drives"]
        self.ifaces = ifaces
        self.vsock = vsock
        self.started = True
        self.paused = not body.get("resume_vm", False)
        return 204, None


def _in_spec(method: str, path: str) -> bool:
    matched = match_path(path)
    return matched is not None and method.lower() in load_spec()["paths"][matched[0]]


def _slug(template: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", template).strip("_")
    return slug or "root"


def _must_exist(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ApiError(f"Cannot open {what} file {path!r}: No such file or directory (os error 2)")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeFirecracker
    options: argparse.Namespace
    requests_seen: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "Firecracker API"

    def address_string(self) -> str:  # client_address is "" for AF_UNIX
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake-firecracker: {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        options = self.server.options
        if options.request_delay:
            time.sleep(options.request_delay)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        fake = self.server.fake
        with fake.lock:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, payload = 400, {"fault_message": "Cannot deserialize the json body of the request."}
            else:
                try:
                    status, payload = fake.handle(method, path, body)
                except ApiError as exc:
                    status, payload = exc.status, {"fault_message": str(exc)}
            try:
                if _in_spec(method, path):
                    validate_response(method, path, status, payload)
            except SpecViolation as exc:
                status, payload = 500, {"fault_message": f"fake firecracker bug: {exc}"}
            self.server.requests_seen += 1
            seen = self.server.requests_seen
            exit_now = fake.exit_requested
        self._send(status, payload)
        if exit_now:
            _exit_soon(0)
        elif options.exit_after_requests is not None and seen >= options.exit_after_requests:
            _exit_soon(options.exit_code if options.exit_code is not None else 1)

    def _send(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)
        self.wfile.flush()


def _exit_soon(code: int) -> None:
    # Like the real VMM, exit without unlinking the API socket: cleaning it up is the owner's job.
    sys.stderr.write(f"fake-firecracker: exiting with code {code}\n")
    sys.stderr.flush()
    os._exit(code)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="firecracker", description=__doc__.splitlines()[0])
    parser.add_argument("--api-sock", help="path of the API Unix socket")
    parser.add_argument("--id", default="anonymous-instance", help="MicroVM unique identifier")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--exit-after-requests", type=int, default=None)
    parser.add_argument("--delay-socket", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int, default=None)
    parser.add_argument("--request-delay", type=float, default=0.0)
    parser.add_argument("--pid-file", default=None, help="write our pid here first thing (for leak checks)")
    parser.add_argument(
        "--ignore-sigterm", action="store_true", help="force the owner to escalate to SIGKILL"
    )
    # Extra knobs may come from the environment so tests can inject them through a wrapper binary.
    extra = os.environ.get("FAKE_FIRECRACKER_ARGS", "").split()
    return parser.parse_args(argv + extra)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    if options.version:
        print(f"Firecracker v{VERSION}\n\nSupported snapshot data format versions: v8.0.0")
        return 0
    if not options.api_sock:
        print("fake-firecracker: --api-sock is required", file=sys.stderr)
        return 2
    if not ID_RE.match(options.id.replace("-", "_")) or len(options.id) > 64:
        print(f"fake-firecracker: invalid instance id {options.id!r}", file=sys.stderr)
        return 1
    if options.pid_file:
        Path(options.pid_file).write_text(f"{os.getpid()}\n")
    if options.exit_code is not None and options.exit_after_requests is None:
        print(f"fake-firecracker: injected failure before binding, exit {options.exit_code}", file=sys.stderr)
        return int(options.exit_code)
    if options.delay_socket:
        time.sleep(options.delay_socket)
    if os.path.exists(options.api_sock):
        print(f"fake-firecracker: Failed to open the API socket: {options.api_sock} exists", file=sys.stderr)
        return 1
    # SIGTERM: die like the real VMM would, leaving the socket for the owner to remove.
    if options.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    server = _Server(options.api_sock, _Handler)
    server.fake = FakeFirecracker(options.id)
    server.options = options
    sys.stderr.write(f"fake-firecracker: listening on {options.api_sock}\n")
    sys.stderr.flush()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
