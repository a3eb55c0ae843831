"""Attack: background processes flood the host (issue 12 part B). Whatever a process prints, and
however long nobody reads it, the host keeps one 1 MiB ring per process plus the connection's
request budget; a lying agent that sends past the process's cap or garbage is cut off, the guest
blamed. The last test runs the flood in a real TCG VM through a Session."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from exec_sandbox.client.agent import AgentClient, AgentClientState
from exec_sandbox.client.process import ProcessState
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import GuestProtocolError
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.support.lying_agent import Send, lying_agent
from tests.support.memory import MIB, RssPeak

BOUND = 64 * MIB  # the documented per-sandbox bound above baseline


@contextlib.asynccontextmanager
async def _client(path: Any) -> AsyncIterator[AgentClient]:
    async with await AgentClient.open_unix(path) as client:
        await client.wait_ready(timeout=10)
        yield client


def _chunk(req_id: str, size: int = MIB) -> bytes:
    from exec_sandbox.protocol import agent as ap

    data = base64.b64encode(b"x" * size).decode()
    return ap.encode_frame({"type": "proc_output", "id": req_id, "stream": "stdout", "data": data})


async def test_lying_agent_floods_past_the_process_cap() -> None:
    """512 MiB for a process whose cap is 8 MiB, nobody reading: cut off, host memory bounded."""

    async def behave(req: dict[str, Any], send: Send) -> None:
        if req["type"] != "proc_start":
            return
        await send.frame({"type": "proc_started", "id": req["id"], "pid": 42})
        frame = _chunk(req["id"])
        for _ in range(512):
            await send.raw(frame)

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        with RssPeak() as mem:
            proc = await client.start_process(["yes"], max_output_bytes=8 * MIB)
            with pytest.raises(GuestProtocolError) as info:
                await proc.wait(60)
        print(f"process output flood: {mem}; the liar pushed {liar.sent_bytes / MIB:.0f} MiB")
        assert info.value.reason == "output_cap"
        assert proc.state is ProcessState.FAILED
        assert client.state is AgentClientState.BROKEN
        assert liar.sent_bytes < 64 * MIB
        assert mem.growth < BOUND, str(mem)


async def test_lying_agent_sends_garbage_as_process_output() -> None:
    async def behave(req: dict[str, Any], send: Send) -> None:
        if req["type"] == "proc_start":
            await send.frame({"type": "proc_started", "id": req["id"], "pid": 42})
            bad = {"type": "proc_output", "id": req["id"], "stream": "stdout", "data": "!!not b64"}
            await send.frame(bad)

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        proc = await client.start_process(["true"])
        with pytest.raises(GuestProtocolError):
            await proc.wait(30)
        assert client.state is AgentClientState.BROKEN


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_unread_flood_from_a_real_guest_process_stays_bounded() -> None:
    """A real guest process prints 128 MiB that nobody reads while the session keeps working."""
    config = SchedulerConfig()
    async with Scheduler(config) as scheduler, await scheduler.session(language="raw") as session:
        with RssPeak() as mem:
            proc = await session.start_process(["head", "-c", str(128 * MIB), "/dev/zero"],
                                               max_output_bytes=256 * MIB)
            try:
                for _ in range(3):
                    assert (await session.exec("echo ok")).stdout == "ok\n"
                done = await asyncio.wait_for(proc.wait(), 240)
            finally:
                await proc.aclose()
        print(f"128 MiB from a guest process, unread: {mem}")
        assert done.exit_code == 0 and done.stdout_bytes == 128 * MIB
        assert mem.growth < BOUND, str(mem)
        left = await session.exec("ps -o args | grep -c '[h]ead -c' || true")
        assert left.stdout.strip() == "0"
