"""A thin wrapper over ``qemu.qmp.QMPClient``: the only QMP client in the project.

It adds what every caller needs and the library leaves out: connecting over a socket
QEMU inherited already connected (:meth:`QmpConnection.attach`), or with retry while
QEMU is still creating its listening socket (giving up as soon as the process is
gone), and mapping library errors to :class:`~smartvm.errors.SmartVMError`::

    SmartVMError(code="QMP_ERROR", details={"error_class": ..., "command": ...})
        the command ran and QEMU refused it (ExecuteError), or the link broke mid-call
    SmartVMError(code="API_CONNECTION_FAILED", retryable=True)
        never connected (socket missing, process exited, timeout)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

from smartvm.errors import ErrorCode, SmartVMError

__all__ = ["QmpConnection"]

log = logging.getLogger(__name__)


class QmpConnection:
    """One QMP session to one QEMU process over its unix socket."""

    def __init__(self, socket_path: Path, *, name: str = "smartvm") -> None:
        self.socket_path = socket_path
        self._client = QMPClient(name)

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def connect(
        self,
        *,
        timeout: float = 30.0,
        alive: Callable[[], bool] | None = None,
        interval: float = 0.005,
    ) -> None:
        """Connect, retrying until the socket accepts, ``alive()`` turns False, or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error: Exception | None = None
        while True:
            if alive is not None and not alive():
                raise SmartVMError(
                    ErrorCode.API_CONNECTION_FAILED,
                    f"QEMU exited before its QMP socket {self.socket_path} accepted a connection",
                    details={"socket": str(self.socket_path)},
                    retryable=True,
                )
            if self.socket_path.exists():
                try:
                    async with asyncio.timeout(5.0):
                        await self._client.connect(str(self.socket_path))
                    return
                except (ConnectError, OSError, TimeoutError) as exc:
                    last_error = exc
                    await self._reset()
            if loop.time() >= deadline:
                raise SmartVMError(
                    ErrorCode.API_CONNECTION_FAILED,
                    f"could not connect to QMP socket {self.socket_path} within {timeout:g}s"
                    + (f": {last_error}" if last_error else ""),
                    details={"socket": str(self.socket_path)},
                    retryable=True,
                ) from last_error
            await asyncio.sleep(interval)

    async def attach(self, sock: socket.socket, *, timeout: float = 30.0) -> None:
        """Talk QMP over ``sock``, the other end of a socket QEMU inherited (``QemuMachineSpec.qmp_fd``).

        No retry: it is connected before QEMU starts, so a failure means QEMU died or is broken.
        ``sock`` is owned from here on, closed on failure and by :meth:`close`.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(sock)
        except (ConnectError, OSError, TimeoutError) as exc:
            sock.close()
            await self._reset()
            raise SmartVMError(
                ErrorCode.API_CONNECTION_FAILED,
                f"QMP handshake over the inherited socket failed: {exc or type(exc).__name__}",
                details={"socket": str(self.socket_path)},
                retryable=True,
            ) from exc
        except BaseException:
            sock.close()
            raise

    async def _reset(self) -> None:
        try:
            await self._client.disconnect()
        except Exception as exc:  # disconnect re-raises whatever broke the link; we are leaving anyway
            log.debug("QMP disconnect from %s: %r", self.socket_path, exc)

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        try:
            return await self._client.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as exc:
            raise SmartVMError(
                ErrorCode.QMP_ERROR,
                f"QMP {command} failed: {exc}",
                details={"error_class": exc.error_class, "command": command, "desc": str(exc)},
            ) from exc
        except (ExecInterruptedError, StateError, ConnectError, OSError) as exc:
            raise SmartVMError(
                ErrorCode.QMP_ERROR,
                f"QMP {command} interrupted: {exc or type(exc).__name__}",
                details={"error_class": type(exc).__name__, "command": command},
            ) from exc

    async def close(self) -> None:
        """Disconnect; idempotent and quiet (the peer may already be gone)."""
        await self._reset()
