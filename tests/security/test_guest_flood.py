"""Attack: a guest floods the host through the agent channel (issue 10, item 5).

The documented bound (README "Limits", SECURITY.md): whatever the guest sends, one sandbox costs
the host at most 64 MiB above baseline with the default caps - ~16 MiB of protocol buffers (socket
reads, one frame, byte-budgeted request queues) plus the output it is allowed to return (10 MiB per
stream by default). A guest that breaks the protocol or floods past a cap is cut off with
:class:`GuestProtocolError` (a guest-side error, never the caller's ``SandboxInputError``).

The first tests use a LYING agent (tests/support/lying_agent.py: real frames, real unix socket, the
real AgentClient); the last ones run hostile user code in real TCG VMs through the Scheduler.
Host memory is the VmRSS of this process, sampled every 5 ms during the attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from exec_sandbox.client.agent import AgentClient, AgentClientState
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestProtocolError,
    SandboxInputError,
)
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.support.lying_agent import Send, lying_agent
from tests.support.memory import MIB, RssPeak

BOUND = 64 * MIB  # the documented per-sandbox bound above baseline
FLOOD = 512 * MIB  # what a lying agent tries to push (the original client kept all of it)


def _output_frame(req_id: str, stream: str = "stdout", size: int = MIB) -> dict[str, Any]:
    return {"type": "output", "id": req_id, "stream": stream, "data": "x" * size}


async def _flood(send: Send, frame: dict[str, Any], total: int) -> None:
    from exec_sandbox.protocol import agent as ap

    raw = ap.encode_frame(frame)
    for _ in range(total // len(raw) + 1):
        await send.raw(raw)


@contextlib.asynccontextmanager
async def _client(path: Any, **kwargs: Any) -> AsyncIterator[AgentClient]:
    async with await AgentClient.open_unix(path, **kwargs) as client:
        await client.wait_ready(timeout=10)
        yield client


def _not_the_callers_fault(exc: BaseException) -> None:
    assert isinstance(exc, GuestProtocolError), repr(exc)
    assert not isinstance(exc, SandboxInputError)


async def test_lying_agent_endless_output_is_cut_at_the_cap() -> None:
    """512 MiB of output for one exec whose cap is 10 MiB: cut off at the cap, the guest blamed."""

    async def behave(req: dict[str, Any], send: Send) -> None:
        await _flood(send, _output_frame(req["id"]), FLOOD)

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        with RssPeak() as mem, pytest.raises(GuestProtocolError) as info:
            await client.exec("print(1)", language="python", timeout_s=60,
                              max_stdout_bytes=10 * MIB, max_stderr_bytes=10 * MIB)
        print(f"output flood: {mem}; the liar pushed {liar.sent_bytes / MIB:.0f} MiB")
        _not_the_callers_fault(info.value)
        assert info.value.reason == "output_cap"
        assert info.value.limit_bytes is not None and info.value.received_bytes is not None
        assert info.value.received_bytes > info.value.limit_bytes
        assert client.state is AgentClientState.BROKEN
        await asyncio.wait_for(liar.hung_up.wait(), 10)  # the host dropped the connection
        assert liar.sent_bytes < 64 * MIB
        assert mem.growth < BOUND, str(mem)


async def test_lying_agent_endless_file_chunks_end_at_the_read_cap() -> None:
    """Endless chunks for one read: the in-memory read stops at its cap with a typed error."""
    import base64
    import hashlib

    chunk = b"\0" * MIB
    piece = {"data": base64.b64encode(chunk).decode(), "sha256": hashlib.sha256(chunk).hexdigest()}

    async def behave(req: dict[str, Any], send: Send) -> None:
        from exec_sandbox.protocol import agent as ap

        seq = 0
        while seq * MIB < FLOOD:
            await send.raw(ap.encode_frame({"type": "file_chunk", "id": req["id"], "seq": seq,
                                            "offset": seq * MIB, **piece}))
            seq += 1

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        from exec_sandbox.errors import GuestFileTooLargeError

        with RssPeak() as mem, pytest.raises(GuestFileTooLargeError) as info:
            await client.read_file("big.bin", max_bytes=10 * MIB)
        print(f"chunk flood, in-memory read capped at 10 MiB: {mem}")
        err = info.value
        assert (err.path, err.limit_bytes) == ("big.bin", 10 * MIB)
        assert 10 * MIB < err.received_bytes <= 11 * MIB
        assert "big.bin" in err.message and str(10 * MIB) in err.message
        assert mem.growth < BOUND, str(mem)
        # The rest of the flood is dropped on arrival; the connection stays usable.
        assert client.state is AgentClientState.READY
        await client.ping()


async def test_streaming_a_huge_file_keeps_memory_bounded() -> None:
    """512 MiB through iter_file (no cap asked for): chunk by chunk, host memory stays bounded."""
    import base64
    import hashlib

    chunk = b"\xab" * MIB
    data = base64.b64encode(chunk).decode()
    digest = hashlib.sha256(chunk).hexdigest()
    count = FLOOD // MIB

    async def behave(req: dict[str, Any], send: Send) -> None:
        whole = hashlib.sha256()
        for seq in range(count):
            whole.update(chunk)
            await send.frame({"type": "file_chunk", "id": req["id"], "seq": seq, "offset": seq * MIB,
                              "data": data, "sha256": digest})
        await send.frame({"type": "read_result", "id": req["id"], "size": count * MIB, "chunks": count,
                          "sha256": whole.hexdigest()})

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        received = 0
        with RssPeak() as mem:
            async with contextlib.aclosing(client.iter_file("huge.bin", max_bytes=None)) as chunks:
                async for part in chunks:
                    received += len(part)
        print(f"streamed {received / MIB:.0f} MiB: {mem}")
        assert received == count * MIB
        assert mem.growth < BOUND, str(mem)


async def test_frames_for_requests_never_made_kill_the_connection() -> None:
    async def behave(req: dict[str, Any], send: Send) -> None:
        for n in range(100_000):
            await send.frame({"type": "cancel_result", "id": f"forged-{n}", "found": True})

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        with RssPeak() as mem, pytest.raises(GuestProtocolError) as info:
            await client.exec("print(1)", language="python", timeout_s=5, reply_grace_s=5)
        _not_the_callers_fault(info.value)
        assert info.value.reason == "unknown_request"
        assert client.stray_frames == 17
        await asyncio.wait_for(liar.hung_up.wait(), 10)
        assert mem.growth < BOUND, str(mem)


async def test_endless_replies_to_an_answered_request_kill_the_connection() -> None:
    async def behave(req: dict[str, Any], send: Send) -> None:
        for _ in range(100_000):
            await send.frame({"type": "list_result", "id": req["id"], "entries": []})

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        assert await client.list_files(".") == []
        with pytest.raises(GuestProtocolError) as info:
            async with asyncio.timeout(10):
                while True:  # the reader sees the repeats and breaks the connection
                    await client.ping()
                    await asyncio.sleep(0.01)
        _not_the_callers_fault(info.value)
        assert client.state is AgentClientState.BROKEN
        await asyncio.wait_for(liar.hung_up.wait(), 10)


async def test_late_replies_to_requests_given_up_on_are_dropped_quietly() -> None:
    """The other side of the rule above: an answer that comes after the host stopped waiting
    (timeout, cancellation, a read cut at its cap) is not a violation."""

    async def behave(req: dict[str, Any], send: Send) -> None:
        await asyncio.sleep(0.5)  # after the caller's timeout
        for _ in range(50):
            await send.frame({"type": "list_result", "id": req["id"], "entries": []})

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        from exec_sandbox.errors import CommunicationOutcomeUnknownError as Unknown

        for _ in range(3):
            with pytest.raises(Unknown):
                await client.list_files(".", timeout=0.2)
        await asyncio.sleep(1.0)
        assert client.discarded_frames == 150 and client.stray_frames == 0
        assert client.state is AgentClientState.READY
        await client.ping()
        assert len(liar.requests) >= 4


async def test_log_flood_of_id_less_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Id-less error frames were each logged at WARNING (a 4 KiB line per frame): one line now."""
    caplog.set_level(logging.DEBUG, logger="exec_sandbox")

    async def behave(req: dict[str, Any], send: Send) -> None:
        for _ in range(200_000):
            await send.frame({"type": "error", "id": None, "code": "x", "message": "L" * 4096})

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        with RssPeak() as mem, pytest.raises(GuestProtocolError) as info:
            await client.exec("print(1)", language="python", timeout_s=5, reply_grace_s=5)
        print(f"log flood: {mem}, {len(caplog.records)} log records")
        _not_the_callers_fault(info.value)
        assert len(caplog.records) <= 5
        assert sum(len(r.getMessage()) for r in caplog.records) < 64 * 1024
        assert mem.growth < BOUND, str(mem)
        assert liar.sent_bytes < 16 * MIB


@pytest.mark.parametrize("length", [2**31, 2**32 - 1])
async def test_a_2_gib_length_prefix_is_refused_at_once(length: int) -> None:
    from exec_sandbox.protocol import agent as ap

    async def behave(req: dict[str, Any], send: Send) -> None:
        await send.raw(ap.MAGIC + bytes([ap.PROTOCOL_VERSION]) + length.to_bytes(4, "big"))
        for _ in range(FLOOD // MIB):
            await send.raw(b"{" * MIB)

    async with lying_agent(behave) as liar, _client(liar.path) as client:
        with RssPeak() as mem, pytest.raises(GuestProtocolError) as info:
            await client.exec("print(1)", language="python", timeout_s=5, reply_grace_s=5)
        _not_the_callers_fault(info.value)
        assert "exceeds" in info.value.message
        await asyncio.wait_for(liar.hung_up.wait(), 10)
        assert liar.sent_bytes < 16 * MIB
        assert mem.growth < BOUND, str(mem)


async def test_a_slow_consumer_cannot_hold_up_other_requests() -> None:
    """One exec's consumer stops reading while its guest floods: the reader stops (back-pressure),
    then abandons that request after ``stall_timeout_s``; the other request is answered."""

    async def behave(req: dict[str, Any], send: Send) -> None:
        if req["type"] == "exec":
            await _flood(send, _output_frame(req["id"], size=256 * 1024), FLOOD)
        else:
            await send.frame({"type": "list_result", "id": req["id"], "entries": []})

    async with lying_agent(behave) as liar, _client(liar.path, stall_timeout_s=1.0) as client:
        with RssPeak() as mem:
            events = client.exec_events("print(1)", language="python", timeout_s=60,
                                        max_stdout_bytes=FLOOD, max_stderr_bytes=FLOOD)
            async with contextlib.aclosing(events):
                first = await anext(events)  # ... and then this consumer stops taking events
                assert first.type == "output"
                await asyncio.sleep(0.5)
                assert await asyncio.wait_for(client.list_files("."), 15) == []
                with pytest.raises(CommunicationOutcomeUnknownError, match="abandoned"):
                    await anext(events)
        print(f"slow consumer: {mem}; the liar pushed {liar.sent_bytes / MIB:.0f} MiB")
        assert mem.growth < BOUND, str(mem)
        assert client.state is AgentClientState.READY


# --------------------------------------------------------------------------- real VMs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    from tests.integration.test_scheduler_support import scheduler_for_tests

    async with scheduler_for_tests(SchedulerConfig(max_file_bytes=10 * MIB)) as sched:
        yield sched


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_guest_flooding_every_channel_for_30s(scheduler: Scheduler) -> None:
    """Hostile user code in a real VM floods stdout and stderr for 30 s (64 KiB writes, both past
    their 10 MiB caps; its own output, so legitimate: capped and flagged) while a thread it left in
    the session grows a file under the host's download. Host memory stays within the bound for the
    whole run and it ends with the guest-side error for the file."""
    from exec_sandbox.errors import GuestFileTooLargeError
    from tests.integration.test_scheduler_support import assert_no_vms
    from tests.support.hostile_code import grow_when_read

    flood = (
        "import os, time\n"
        "block = b'z' * 65536\n"
        "end = time.monotonic() + 30\n"
        "while time.monotonic() < end:\n"
        "    os.write(1, block)\n"
        "    os.write(2, block)\n"
    )
    streamed = {"stdout": 0, "stderr": 0}

    async def on_stdout(data: str) -> None:
        streamed["stdout"] += len(data)
        await asyncio.sleep(0)  # an async consumer, as a server streaming to a client would be

    def on_stderr(data: str) -> None:
        streamed["stderr"] += len(data)

    cap = scheduler.config.max_output_bytes
    async with await scheduler.session(language="python") as s:
        with RssPeak() as mem:
            made = await s.exec(grow_when_read("out.bin", initial_mib=4, grow_mib=200))
            assert made.exit_code == 0, made.stderr
            result = await s.exec(flood, timeout_seconds=60, on_stdout=on_stdout, on_stderr=on_stderr)
            with pytest.raises(GuestFileTooLargeError) as info:
                await s.read_file("out.bin")
        print(f"every channel for 30 s: {mem}; stdout {len(result.stdout)} chars "
              f"(truncated={result.stdout_truncated}), stderr {len(result.stderr)} chars; "
              f"file cut at {info.value.received_bytes} bytes")
    assert result.stdout_truncated and result.stderr_truncated
    assert cap <= len(result.stdout) <= cap + 200 and cap <= len(result.stderr) <= cap + 200
    assert streamed == {"stdout": len(result.stdout), "stderr": len(result.stderr)}
    assert not isinstance(info.value, SandboxInputError)
    assert info.value.limit_bytes == scheduler.config.max_file_bytes
    assert mem.growth < BOUND, str(mem)
    await assert_no_vms(scheduler)


async def test_console_log_flood_keeps_subscribers_bounded() -> None:
    """The guest console (boot log) floods 1.2 GB of long lines while a boot-log subscriber is
    slow: its queue keeps at most ~1 Mi characters (the oldest lines go), the tail 64 KiB."""
    import tracemalloc

    from smartvm.qemu.console import ConsoleBuffer

    console = ConsoleBuffer()
    lines = console.lines()
    first = asyncio.ensure_future(anext(lines))  # subscribed, then never reads again
    await asyncio.sleep(0)
    line = b"k" * (60 * 1024) + b"\n"
    tracemalloc.start()  # Python allocations exactly (RSS may reuse a heap grown earlier)
    try:
        for _ in range(20_000):
            console.feed(line)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"console flood: Python heap peak {peak / MIB:.1f} MiB, {current / MIB:.1f} MiB kept")
    assert peak < 8 * MIB and current < 4 * MIB
    assert console.total_bytes == 20_000 * len(line)
    assert len(console.output()) <= console.limit
    assert (await first) == "k" * (60 * 1024)
    await lines.aclose()


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_a_protocol_violation_kills_the_sessions_vm(scheduler: Scheduler) -> None:
    """Guest code cannot reach the agent's port, so the lie is injected where the guest's bytes
    arrive on the host (the client's stream): the session reports the guest-side error, closes
    itself (reason ``vm_failed``) and its QEMU is gone."""
    from exec_sandbox.protocol import agent as ap
    from exec_sandbox.sandbox.lifecycle_errors import SessionClosedError
    from tests.integration.test_scheduler_support import assert_no_vms, qemu_children

    s = await scheduler.session(language="python")
    assert (await s.exec("print('up')")).stdout == "up\n"
    assert qemu_children(include_daemon=False)
    exec_task = asyncio.create_task(s.exec("import time\ntime.sleep(30)", timeout_seconds=60))
    await asyncio.sleep(0.5)
    reader = s.vm.agent._reader  # what the guest sends lands here
    reader.feed_data(ap.MAGIC + bytes([ap.PROTOCOL_VERSION]) + (2**31).to_bytes(4, "big"))
    with pytest.raises(GuestProtocolError) as info:
        await asyncio.wait_for(exec_task, 30)
    _not_the_callers_fault(info.value)
    assert s.closed and s.close_reason == "vm_failed"
    with pytest.raises(SessionClosedError):
        await s.exec("print(1)")
    await assert_no_vms(scheduler)
