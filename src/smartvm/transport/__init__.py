"""Transports that move bytes to a VMM: HTTP over the Firecracker API Unix socket."""

from smartvm.transport.socket_client import SocketClient

__all__ = ["SocketClient"]
