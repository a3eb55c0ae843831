"""A hostile guest agent on the host: real frames over a real unix socket to the real AgentClient.

Guest code runs as uid 1000 and cannot replace the agent in a real VM, but the threat model assumes
it could (a kernel exploit, a compromised image): so the client is attacked with an agent that lies.
It greets like the real one and answers pings; every other request is handed to the test's
``behave(request, send)`` coroutine, run as its own task (requests are served concurrently, as
the real agent does). Writes always wait for the socket to drain, so the fake itself holds no more
than a frame or two: memory growth in the test process is the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exec_sandbox.protocol import agent as ap

__all__ = ["HELLO", "LyingAgent", "Send", "lying_agent"]

HELLO: dict[str, Any] = {
    "type": "hello", "id": None, "agent_version": "liar", "protocol_version": 1, "capabilities": [],
    "languages": ["python"], "instance": "liar", "pid": 1, "uid": 0, "workdir": "/home/sandbox",
    "max_frame_bytes": ap.MAX_FRAME_BYTES, "boot": {},
}


class Send:
    """Writes frames (or raw bytes) and waits for the peer to take them."""

    def __init__(self, writer: asyncio.StreamWriter, agent: LyingAgent) -> None:
        self._writer = writer
        self._agent = agent

    async def raw(self, data: bytes) -> None:
        self._writer.write(data)
        self._agent.sent_bytes += len(data)
        await self._writer.drain()

    async def frame(self, msg: dict[str, Any]) -> None:
        await self.raw(ap.encode_frame(msg))


Behave = Callable[[dict[str, Any], Send], Awaitable[None]]


@dataclass
class LyingAgent:
    path: Path
    sent_bytes: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed the socket


@contextlib.asynccontextmanager
async def lying_agent(behave: Behave) -> AsyncIterator[LyingAgent]:
    base = Path(tempfile.mkdtemp(prefix="sbx-liar-", dir="/tmp"))
    agent = LyingAgent(path=base / "agent.sock")
    tasks: set[asyncio.Task[None]] = set()

    async def serve(req: dict[str, Any], send: Send) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await behave(req, send)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        send = Send(writer, agent)
        decoder = ap.FrameDecoder()
        try:
            await send.frame(HELLO)
            while data := await reader.read(65536):
                for payload in decoder.feed(data):
                    req = json.loads(payload)
                    agent.requests.append({k: v for k, v in req.items() if k != "code"})
                    if req["type"] == "ping":
                        await send.frame({**HELLO, "id": req["id"]})
                    elif req["type"] != "cancel":
                        task = asyncio.get_running_loop().create_task(serve(req, send))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
        except (ConnectionError, OSError):
            pass
        finally:
            agent.hung_up.set()
            for task in list(tasks):
                task.cancel()
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(agent.path))
    try:
        yield agent
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        shutil.rmtree(base, ignore_errors=True)
