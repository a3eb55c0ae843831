"""Byte channels to the host: the virtio-serial port (in the guest) and a unix socket (tests)."""

from __future__ import annotations

import os
import sys
import threading
import time

from .wire import READ_CHUNK

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Transport:
    """Blocking byte channel that survives host disconnects."""

    on_connect: object = None  # callable() invoked when a (new) host connection is detected

    def recv(self) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def send(self, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _connected(self) -> None:
        if callable(self.on_connect):
            self.on_connect()


class VirtioTransport(Transport):
    """The virtio-serial port: reads see EOF while no host is connected, writes block.

    While the host is away the agent waits for it without reading: ``poll`` reports POLLHUP until
    the host connects, and the guest kernel raises SIGIO on the port's owner when the host
    (dis)connects (O_ASYNC), which wakes the wait at once. That matters after a snapshot restore:
    the restored guest sees the old host leave and the new one arrive within milliseconds, and the
    agent must greet it immediately instead of at the next tick of a backoff timer. Without SIGIO
    (another kernel, or not the main thread) the wait falls back to a short capped backoff.
    """

    def __init__(self, port_name: str, device: str | None) -> None:
        self.path = device or self._find(port_name)
        self.fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self.connected = False
        self.wlock = threading.Lock()
        self.wake_r = -1
        self._arm_sigio()

    def _arm_sigio(self) -> None:
        # _signal, not signal: the wrapper imports enum and builds IntEnums, costly at boot under TCG.
        signal: Any = __import__("_signal")

        if threading.current_thread() is not threading.main_thread():
            return
        try:
            r, w = os.pipe()
            for fd in (r, w):
                os.set_blocking(fd, False)
                os.set_inheritable(fd, False)
            # The handler does nothing: Python's C-level handler writes to the wakeup fd, which the
            # disconnected wait selects on. Installed before O_ASYNC so SIGIO can never kill PID 1.
            signal.signal(signal.SIGIO, lambda _sig, _frame: None)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            self.wake_r = r
        except (OSError, ValueError, AttributeError):
            self.wake_r = -1

    def _set_async(self, on: bool) -> None:
        # SIGIO only while the host is away: when connected it would fire for every incoming chunk.
        if self.wake_r < 0:
            return
        import fcntl

        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            want = flags | os.O_ASYNC if on else flags & ~os.O_ASYNC
            if want != flags:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, want)
        except OSError:
            pass

    def _host_present(self) -> bool:
        import select

        p = select.poll()
        p.register(self.fd, select.POLLIN)
        events = p.poll(0)
        return not any(ev & select.POLLHUP for _fd, ev in events)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 256):
                pass
        except OSError:
            pass

    @staticmethod
    def _find(port_name: str) -> str:
        # Wait as long as it takes (as PID 1, exiting would panic the kernel), but say so once.
        warn_at: float | None = time.monotonic() + 5.0
        while True:
            base = "/sys/class/virtio-ports"
            try:
                entries = sorted(os.listdir(base))
            except OSError:
                entries = []
            for entry in entries:
                try:
                    with open(f"{base}/{entry}/name") as fh:
                        name = fh.read().strip()
                except OSError:
                    continue
                if name == port_name:
                    dev = f"/dev/{entry}"
                    if not os.path.exists(dev):
                        _mknod_from_sysfs(f"{base}/{entry}/dev", dev)
                    return dev
            if warn_at is not None and time.monotonic() > warn_at:
                print(f"sbx-agent: still waiting for virtio port {port_name!r}", file=sys.stderr, flush=True)
                warn_at = None
            time.sleep(0.01 if warn_at is not None else 0.2)

    def recv(self) -> bytes:
        delay = 0.001
        while True:
            if self.connected:
                data = os.read(self.fd, READ_CHUNK)
                if data:
                    return data
                # EOF: the host left (or a restored guest sees its snapshot-time host go away).
                self.connected = False
                self._set_async(True)
                return b""
            if self.wake_r >= 0:
                self._set_async(True)
                self._drain_wake()  # before the check: a SIGIO from here on wakes the wait below
            if self._host_present():
                self.connected = True
                self._set_async(False)
                self._connected()
                continue
            if self.wake_r >= 0:
                import select

                # SIGIO announces the host: the timeout is only a safety net (never spin, never hang).
                select.select([self.wake_r], [], [], delay)
                delay = min(delay * 2, 0.5)
            else:
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        with self.wlock:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]


def _mknod_from_sysfs(dev_attr: str, path: str) -> None:
    import stat

    with open(dev_attr) as fh:
        major, minor = (int(x) for x in fh.read().strip().split(":"))
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))


class UnixTransport(Transport):
    """Unix socket transport for running the agent on the host in tests (connect or listen)."""

    def __init__(self, path: str, listen: bool) -> None:
        import socket

        self._socket_mod = socket
        self.path = path
        self.listen = listen
        self.sock: Any = None
        self.cond = threading.Condition()
        self.server: Any = None
        if listen:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(path)
            self.server.listen(4)

    def _establish(self) -> None:
        socket = self._socket_mod
        if self.listen:
            assert self.server is not None
            conn, _ = self.server.accept()
        else:
            delay = 0.01
            while True:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    conn.connect(self.path)
                    break
                except OSError:
                    conn.close()
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
        with self.cond:
            self.sock = conn
            self.cond.notify_all()
        self._connected()

    def recv(self) -> bytes:
        while True:
            if self.sock is None:
                self._establish()
            sock = self.sock
            try:
                data: bytes = sock.recv(READ_CHUNK)
            except OSError:
                data = b""
            if data:
                return data
            with self.cond:
                if self.sock is sock:
                    self.sock = None
            try:
                sock.close()
            except OSError:
                pass
            if not self.listen:
                time.sleep(0.05)
            return b""

    def send(self, data: bytes) -> None:
        with self.cond:
            while self.sock is None:
                self.cond.wait()
            sock = self.sock
        try:
            sock.sendall(data)
        except OSError:
            pass  # the host went away mid-frame; a new host must not see the tail

