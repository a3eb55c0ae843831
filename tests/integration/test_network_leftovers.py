"""A process killed outright with a networked session leaves nothing of its egress edge behind.

Real processes; the attack is SIGKILL. Two child Pythons each run a Scheduler on one shared runtime
dir with a networked session (``allowed_domains`` + ``host_overrides`` to the test's servers on
127.0.0.1, ``egress_allow_private``), make a request through their egress gateway, and one of them
starts a request the test's server holds open, so that a ``socat`` connector is running for it.
That child is SIGKILLed: its QEMU dies with it (parent-death signal) and its connector with the
connection. What nothing of the dead process can remove - the ``egress-*`` dir with its gateway's
Unix sockets and owner record, its VM dir, overlay and pool - is removed when a Scheduler starts
next on that runtime dir, while the live child's egress dir, QEMU and gateway keep working.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import socket
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.settings import Settings
from smartvm.leftovers import OWNER_FILE, SIDECAR_SUFFIX, process_start_ticks
from tests.integration.egress_support import LocalServer, local_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHILD = textwrap.dedent(
    """
    import asyncio, contextlib, json, sys
    from pathlib import Path
    from exec_sandbox import Scheduler, SchedulerConfig
    from exec_sandbox.settings import Settings

    GET = ("import urllib.request as u; "
           "print(u.urlopen('http://web.test:%d/say/via-egress', timeout=60).read().decode())")
    HOLD = "import urllib.request as u; u.urlopen('http://hold.test:%d/held', timeout=600)"

    async def main():
        runtime_dir, plain, hold = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
        config = SchedulerConfig(
            allowed_domains=["web.test", "hold.test"],
            host_overrides={"web.test": "127.0.0.1", "hold.test": "127.0.0.1"},
            egress_allow_private=True, enable_memory_snapshots=False,
        )
        loop = asyncio.get_running_loop()
        settings = Settings(force_emulation=True)
        async with Scheduler(config, settings=settings, runtime_dir=runtime_dir) as scheduler:
            async with await scheduler.session() as session:
                held = None
                command = "get"
                while command:
                    if command == "get":
                        result = await session.exec(GET % plain, timeout_seconds=120)
                        line = {"qemu": session.vm.machine.pid, "out": result.stdout.strip(),
                                "exit": result.exit_code, "err": result.stderr[-500:]}
                        print(json.dumps(line), flush=True)
                    elif command == "hold":
                        held = asyncio.ensure_future(session.exec(HOLD % hold, timeout_seconds=600))
                    command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
                if held is not None:
                    held.cancel()
                    with contextlib.suppress(BaseException):
                        await held

    asyncio.run(main())
    """
)

_CONNECTOR = re.compile(r"UNIX-CONNECT:(/\S+)/[^/\s]+\.sock")


class HoldServer:
    """A TCP server on 127.0.0.1 that reads a request and never answers; ``arrived`` gets each one."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.arrived: queue.Queue[bytes] = queue.Queue()
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.arrived.put(data)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()
        self._thread.join(5)


@pytest.fixture
def plain() -> Iterator[LocalServer]:
    with local_server() as server:
        yield server


@pytest.fixture
def hold() -> Iterator[HoldServer]:
    server = HoldServer()
    yield server
    server.close()


@pytest.fixture
def shared_runtime_dir() -> Iterator[Path]:
    """A short dir of its own (never smartvm's default runtime dir, which other starts reap)."""
    path = Path(tempfile.mkdtemp(prefix="sbn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\x00") if part]


def _alive(pid: int, start: int | None) -> bool:
    """The process that had ``start`` still runs (not a zombie, not a reused pid)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = raw.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and process_start_ticks(pid) == start


def egress_dir_of(qemu_pid: int) -> Path:
    """The gateway dir a QEMU's guestfwd connectors lead to (from its command line)."""
    found = {m.group(1) for arg in _cmdline(qemu_pid) for m in _CONNECTOR.finditer(arg)}
    assert len(found) == 1, found
    return Path(found.pop())


def connectors_to(egress_dir: Path) -> list[tuple[int, int | None]]:
    """(pid, start) of the running socat connectors into ``egress_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if (
                argv
                and Path(argv[0]).name == "socat"
                and any(a.startswith(f"UNIX-CONNECT:{egress_dir}/") for a in argv)
            ):
                found.append((int(entry.name), process_start_ticks(int(entry.name))))
    return found


def records_of(owner_pid: int, root: Path) -> list[Path]:
    """Every owner record under ``root`` (a dir's ``owner.json``, a file's sidecar) naming ``owner_pid``."""
    hits = []
    for path in root.rglob("*"):
        if path.name != OWNER_FILE and not path.name.endswith(SIDECAR_SUFFIX):
            continue
        try:
            record = json.loads(path.read_bytes())
        except (FileNotFoundError, IsADirectoryError):
            continue  # gone meanwhile (a live owner's own cleanup)
        if record.get("owner_pid") == owner_pid:
            hits.append(path)
    return hits


async def poll(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Wait for ``predicate()`` with a deadline (a bound on waiting, not a speed assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"still waiting after {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


class Child:
    """A child Python running :data:`CHILD`: a Scheduler + networked session on ``runtime_dir``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, runtime_dir: Path, plain: int, hold: int) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(runtime_dir),
            str(plain),
            str(hold),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(240):
            raw = await self.proc.stdout.readline()
        assert raw, f"the child exited ({await self.proc.wait()}) before answering"
        reply: dict[str, Any] = json.loads(raw)
        assert reply["exit"] == 0 and reply["out"] == "via-egress", reply
        return reply

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())

    async def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        async with asyncio.timeout(120):
            return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def test_a_killed_networked_session_leaves_no_egress_dir_socket_or_process(
    shared_runtime_dir: Path, plain: LocalServer, hold: HoldServer
) -> None:
    runtime = shared_runtime_dir
    doomed = await Child.start(runtime, plain.port, hold.port)
    survivor: Child | None = None
    try:
        doomed_qemu = (await doomed.line())["qemu"]
        doomed_dir = egress_dir_of(doomed_qemu)
        assert doomed_dir.parent == runtime and doomed_dir.name.startswith("egress-")
        doomed.send("hold")  # a connection the test's server keeps open: its connector keeps running
        await asyncio.to_thread(hold.arrived.get, timeout=120)
        connectors: list[tuple[int, int | None]] = []

        def connector_seen() -> bool:
            connectors[:] = connectors_to(doomed_dir)
            return bool(connectors)

        await poll(connector_seen, f"a socat connector into {doomed_dir}")

        survivor = await Child.start(runtime, plain.port, hold.port)
        survivor_qemu = (await survivor.line())["qemu"]
        survivor_start = process_start_ticks(survivor_qemu)
        survivor_dir = egress_dir_of(survivor_qemu)
        survivor_files = sorted(p.name for p in survivor_dir.iterdir())
        assert survivor_dir != doomed_dir and OWNER_FILE in survivor_files

        qemu_start = process_start_ticks(doomed_qemu)
        doomed_pid = doomed.proc.pid
        await doomed.kill()  # SIGKILL: nothing of the child's own cleanup runs
        await poll(lambda: not _alive(doomed_qemu, qemu_start), "the killed child's QEMU to die")
        await poll(
            lambda: not any(_alive(p, s) for p, s in connectors), f"its connectors {connectors} to end"
        )
        assert connectors_to(doomed_dir) == []
        # The leak the next Scheduler must clear: the gateway's sockets and owner record.
        leaked = sorted(p.name for p in doomed_dir.iterdir())
        assert OWNER_FILE in leaked and any(name.endswith(".sock") for name in leaked), leaked
        assert records_of(doomed_pid, runtime)

        config = SchedulerConfig(enable_memory_snapshots=False)
        async with Scheduler(config, settings=Settings(force_emulation=True), runtime_dir=runtime):
            assert not doomed_dir.exists()
            assert [p for p in runtime.iterdir() if p.name.startswith("egress-")] == [survivor_dir]
            assert records_of(doomed_pid, runtime) == []  # nor its VM dir, overlay or pool
            # The live child's egress edge is untouched and still carries its traffic.
            assert sorted(p.name for p in survivor_dir.iterdir()) == survivor_files
            assert _alive(survivor_qemu, survivor_start)
            survivor.send("get")
            await survivor.line()
            assert await survivor.finish() == 0
            assert not survivor_dir.exists()  # a clean close removes its own
        assert list(runtime.iterdir()) == []
    finally:
        await doomed.kill()
        if survivor is not None:
            await survivor.kill()
