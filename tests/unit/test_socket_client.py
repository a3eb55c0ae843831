"""SocketClient against an in-process HTTP server on a Unix socket (no child processes)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.transport import SocketClient
from tests.fake_firecracker.harness import short_tmp_dir

Handler = Callable[[str, str, bytes], Awaitable[tuple[int, bytes] | None]]


class TinyHttpServer:
    """Just enough HTTP/1.1 to exercise the client: one handler decides status and body."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[tuple[str, str, bytes, dict[str, str]]] = []
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> TinyHttpServer:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, target, _ = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    key, value = line.decode().split(":", 1)
                    headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, target, body, headers))
                answer = await self.handler(method, target, body)
                if answer is None:  # drop the connection without answering
                    return
                status, payload = answer
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n"
                    "Content-Type: application/json\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@pytest.fixture
async def sock_dir() -> AsyncIterator[Path]:
    with short_tmp_dir() as path:
        yield path


def json_handler(status: int, payload: Any) -> Handler:
    async def handle(method: str, target: str, body: bytes) -> tuple[int, bytes]:
        return status, b"" if payload is None else json.dumps(payload).encode()

    return handle


async def test_get_returns_parsed_json(sock_dir: Path) -> None:
    info = {"app_name": "Firecracker", "id": "vm1", "state": "Running", "vmm_version": "1.16.1"}
    async with (
        TinyHttpServer(sock_dir / "api.sock", json_handler(200, info)),
        SocketClient(sock_dir / "api.sock") as client,
    ):
        assert await client.get("/") == info


async def test_put_sends_json_body_and_returns_none_on_204(sock_dir: Path) -> None:
    async with (
        TinyHttpServer(sock_dir / "api.sock", json_handler(204, None)) as server,
        SocketClient(sock_dir / "api.sock") as client,
    ):
        assert await client.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) is None
        assert await client.patch("/vm", {"state": "Paused"}) is None
    (m1, t1, b1, h1), (m2, t2, b2, _) = server.requests
    assert (m1, t1, json.loads(b1)) == ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    assert h1["content-type"] == "application/json"
    assert (m2, t2, json.loads(b2)) == ("PATCH", "/vm", {"state": "Paused"})


async def test_api_error_carries_status_and_fault_message(sock_dir: Path) -> None:
    fault = "The requested operation is not supported after starting the microVM."
    async with (
        TinyHttpServer(sock_dir / "api.sock", json_handler(400, {"fault_message": fault})),
        SocketClient(sock_dir / "api.sock") as client,
    ):
        with pytest.raises(SmartVMError) as info:
            await client.put("/boot-source", {"kernel_image_path": "/vmlinux"})
    assert info.value.code == ErrorCode.API_ERROR
    assert info.value.status_code == 400
    assert info.value.fault_message == fault
    assert "PUT /boot-source" in info.value.message


async def test_server_error_without_json_keeps_the_text(sock_dir: Path) -> None:
    async def handle(method: str, target: str, body: bytes) -> tuple[int, bytes]:
        return 500, b"internal trouble"

    async with TinyHttpServer(sock_dir / "api.sock", handle), SocketClient(sock_dir / "api.sock") as client:
        with pytest.raises(SmartVMError) as info:
            await client.get("/")
    assert (info.value.code, info.value.status_code) == (ErrorCode.API_ERROR, 500)
    assert info.value.fault_message == "internal trouble"


async def test_non_json_success_body_is_an_api_error(sock_dir: Path) -> None:
    async def handle(method: str, target: str, body: bytes) -> tuple[int, bytes]:
        return 200, b"<html>"

    async with TinyHttpServer(sock_dir / "api.sock", handle), SocketClient(sock_dir / "api.sock") as client:
        with pytest.raises(SmartVMError) as info:
            await client.get("/")
    assert info.value.code == ErrorCode.API_ERROR
    assert "non-JSON" in info.value.message


async def test_missing_socket_is_a_retryable_connection_failure(sock_dir: Path) -> None:
    async with SocketClient(sock_dir / "nothing.sock") as client:
        with pytest.raises(SmartVMError) as info:
            await client.get("/")
    assert info.value.code == ErrorCode.API_CONNECTION_FAILED
    assert info.value.retryable is True
    assert str(sock_dir / "nothing.sock") in info.value.message


async def test_refused_connection_is_a_connection_failure(sock_dir: Path) -> None:
    path = sock_dir / "dead.sock"
    # A socket file nobody listens on: connect() gets ECONNREFUSED.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    async with SocketClient(path) as client:
        with pytest.raises(SmartVMError) as info:
            await client.get("/")
    assert info.value.code == ErrorCode.API_CONNECTION_FAILED
    assert info.value.retryable is True


async def test_connection_dropped_mid_request_is_not_retryable(sock_dir: Path) -> None:
    async def handle(method: str, target: str, body: bytes) -> None:
        return None

    async with TinyHttpServer(sock_dir / "api.sock", handle), SocketClient(sock_dir / "api.sock") as client:
        with pytest.raises(SmartVMError) as info:
            await client.put("/actions", {"action_type": "InstanceStart"})
    assert info.value.code == ErrorCode.API_CONNECTION_FAILED
    assert info.value.retryable is False


async def test_timeout_maps_to_api_timeout_and_can_be_overridden_per_request(sock_dir: Path) -> None:
    release = asyncio.Event()

    async def handle(method: str, target: str, body: bytes) -> tuple[int, bytes]:
        if target == "/slow":
            await release.wait()
        return 204, b""

    async with (
        TinyHttpServer(sock_dir / "api.sock", handle),
        SocketClient(sock_dir / "api.sock", timeout=30.0) as client,
    ):
        with pytest.raises(SmartVMError) as info:
            await client.put("/slow", {}, timeout=0.2)
        assert info.value.code == ErrorCode.API_TIMEOUT
        assert info.value.details["timeout"] == 0.2
        release.set()
        assert await client.put("/fast", {}) is None


async def test_wait_for_socket_times_out_when_nothing_listens(sock_dir: Path) -> None:
    client = SocketClient(sock_dir / "never.sock")
    with pytest.raises(SmartVMError) as info:
        await client.wait_for_socket(0.2)
    assert info.value.code == ErrorCode.SOCKET_TIMEOUT
    assert "does not exist" in info.value.message
    await client.aclose()


async def test_wait_for_socket_returns_once_a_server_listens(sock_dir: Path) -> None:
    path = sock_dir / "late.sock"
    client = SocketClient(path)
    waiter = asyncio.create_task(client.wait_for_socket(60.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    async with TinyHttpServer(path, json_handler(204, None)):
        await waiter
    await client.aclose()


def test_rejects_socket_paths_longer_than_sun_path() -> None:
    with pytest.raises(SmartVMError) as info:
        SocketClient("/tmp/" + "x" * 120)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "107 bytes" in info.value.message


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"long_timeout": -1.0}])
def test_rejects_non_positive_timeouts(kwargs: dict[str, float]) -> None:
    with pytest.raises(SmartVMError) as info:
        SocketClient("/tmp/x.sock", **kwargs)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


async def test_relative_api_path_is_rejected(sock_dir: Path) -> None:
    async with SocketClient(sock_dir / "api.sock") as client:
        with pytest.raises(SmartVMError) as info:
            await client.get("version")
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


async def test_closed_client_refuses_requests_and_aclose_is_idempotent(sock_dir: Path) -> None:
    client = SocketClient(sock_dir / "api.sock", long_timeout=300.0)
    assert client.long_timeout == 300.0
    await client.aclose()
    await client.aclose()
    assert client.closed
    with pytest.raises(SmartVMError) as info:
        await client.get("/")
    assert info.value.code == ErrorCode.NO_CLIENT
