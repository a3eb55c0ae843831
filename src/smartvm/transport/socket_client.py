"""Async HTTP over a VMM's API Unix socket (Firecracker's API), with errors mapped at the boundary.

Every httpx error becomes a :class:`~smartvm.errors.SmartVMError`:

- HTTP 4xx/5xx      -> ``API_ERROR`` with ``status_code`` and Firecracker's ``fault_message``
- timeouts          -> ``API_TIMEOUT`` (outcome unknown: the VMM may have acted)
- cannot connect    -> ``API_CONNECTION_FAILED`` with ``retryable=True`` (the request never ran)
- dropped mid-call  -> ``API_CONNECTION_FAILED`` with ``retryable=False`` (outcome unknown)
"""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from smartvm.errors import ErrorCode, SmartVMError

__all__ = ["SocketClient"]

# Linux sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# The Host header is irrelevant over a Unix socket, but HTTP/1.1 needs one.
_BASE_URL = "http://localhost"


class SocketClient:
    """One VMM API endpoint. ``get``/``put``/``patch`` return the parsed JSON body (None for 204)."""

    def __init__(self, socket_path: str | Path, *, timeout: float = 5.0, long_timeout: float = 120.0) -> None:
        path = Path(socket_path)
        if not str(path):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "socket_path must not be empty")
        if len(str(path).encode()) > _MAX_SOCKET_PATH:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"socket_path is longer than {_MAX_SOCKET_PATH} bytes (AF_UNIX limit): {path}",
                details={"socket_path": str(path)},
            )
        if timeout <= 0 or long_timeout <= 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "timeouts must be positive")
        self._socket_path = path
        self._timeout = timeout
        self._long_timeout = long_timeout
        # Created lazily so constructing a client never allocates resources that need closing.
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def long_timeout(self) -> float:
        """The timeout callers pass for slow operations (snapshot create/load)."""
        return self._long_timeout

    @property
    def closed(self) -> bool:
        return self._closed

    def _http(self) -> httpx.AsyncClient:
        if self._closed:
            raise SmartVMError(
                ErrorCode.NO_CLIENT, f"SocketClient for {self._socket_path} is closed", retryable=False
            )
        if self._client is None:
            transport = httpx.AsyncHTTPTransport(uds=str(self._socket_path), retries=0)
            self._client = httpx.AsyncClient(transport=transport, base_url=_BASE_URL, timeout=self._timeout)
        return self._client

    async def get(self, path: str, *, timeout: float | None = None) -> Any:
        return await self.request("GET", path, timeout=timeout)

    async def put(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        return await self.request("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        return await self.request("PATCH", path, body, timeout=timeout)

    async def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """Send one request; ``timeout`` overrides the client default for this call only."""
        if not path.startswith("/"):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"API path must start with '/': {path!r}")
        client = self._http()
        effective = self._timeout if timeout is None else timeout
        what = f"{method} {path}"
        content = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await client.request(method, path, content=content, headers=headers, timeout=effective)
        except httpx.TimeoutException as exc:
            raise SmartVMError(
                ErrorCode.API_TIMEOUT,
                f"{what} timed out after {effective:g}s on {self._socket_path}",
                details={"method": method, "path": path, "timeout": effective},
            ) from exc
        except httpx.ConnectError as exc:
            raise SmartVMError(
                ErrorCode.API_CONNECTION_FAILED,
                f"cannot connect to API socket {self._socket_path} for {what}: {exc}",
                details={"method": method, "path": path, "socket_path": str(self._socket_path)},
                retryable=True,
            ) from exc
        except httpx.TransportError as exc:
            raise SmartVMError(
                ErrorCode.API_CONNECTION_FAILED,
                f"connection to {self._socket_path} broke during {what}: {exc!r}",
                details={"method": method, "path": path, "socket_path": str(self._socket_path)},
            ) from exc
        return self._parse(method, path, response)

    @staticmethod
    def _parse(method: str, path: str, response: httpx.Response) -> Any:
        text = response.text
        parsed: Any = None
        if text.strip():
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                if response.is_success:
                    raise SmartVMError(
                        ErrorCode.API_ERROR,
                        f"{method} {path} returned a non-JSON body",
                        status_code=response.status_code,
                        details={"body": text[:500]},
                    ) from exc
        if response.is_success:
            return parsed
        fault = parsed.get("fault_message") if isinstance(parsed, dict) else None
        fault_message = str(fault) if fault is not None else (text[:500] or None)
        reason = fault_message or response.reason_phrase
        raise SmartVMError(
            ErrorCode.API_ERROR,
            f"{method} {path} failed with HTTP {response.status_code}: {reason}",
            status_code=response.status_code,
            fault_message=fault_message,
            details={"method": method, "path": path},
        )

    async def wait_for_socket(self, timeout: float, *, interval: float = 0.02) -> None:
        """Wait until something accepts connections on the socket; SOCKET_TIMEOUT otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error: str = "socket file does not exist"
        while True:
            if await self._accepts_connections():
                return
            if self._socket_path.exists():
                last_error = "socket exists but refuses connections"
            if loop.time() >= deadline:
                raise SmartVMError(
                    ErrorCode.SOCKET_TIMEOUT,
                    f"API socket {self._socket_path} not ready after {timeout:g}s ({last_error})",
                    details={"socket_path": str(self._socket_path), "timeout": timeout},
                )
            await asyncio.sleep(interval)

    async def _accepts_connections(self) -> bool:
        try:
            if not stat.S_ISSOCK(self._socket_path.stat().st_mode):
                return False
        except OSError:
            return False
        try:
            _, writer = await asyncio.open_unix_connection(str(self._socket_path))
        except OSError:
            return False
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True

    async def aclose(self) -> None:
        """Close the pooled connections. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> SocketClient:
        self._http()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"SocketClient(socket_path={str(self._socket_path)!r}, timeout={self._timeout})"
