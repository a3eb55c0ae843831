"""Background processes of the real guest agent (run on the host over a unix socket), through the
host's ProcessHandle: output streaming, stdin, PTY, signals, reconnecting readers, and the attacks
(a flood nobody reads, a process tree that wants to outlive its kill)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox.client.agent import AgentClient
from exec_sandbox.client.process import ProcessChunk, ProcessHandle, ProcessState
from exec_sandbox.errors import GuestAgentError, SandboxInputError
from tests.integration.test_agent_local import IS_ROOT, RunningAgent, _pids_mentioning, run_agent
from tests.support.memory import MIB, RssPeak

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
async def agent() -> AsyncIterator[RunningAgent]:
    async with run_agent() as running:
        yield running


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as c:
        await c.wait_ready(timeout=30)
        yield c


def _own_dir(agent: RunningAgent, name: str) -> Path:
    """A work dir of one test's processes: they are found by their cwd (the agent's own command
    line names the agent's work dir)."""
    path = agent.workdir / name
    path.mkdir()
    if IS_ROOT:
        os.chown(path, 1000, 1000)
    return path


async def _collect(handle: ProcessHandle, *, replay: bool = True) -> dict[str, bytes]:
    out: dict[str, bytes] = {"stdout": b"", "stderr": b"", "pty": b""}
    async with contextlib.aclosing(handle.output(replay=replay)) as chunks:
        async for chunk in chunks:
            out[chunk.stream] += chunk.data
    return out


async def _read_until(chunks: AsyncIterator[ProcessChunk], needle: bytes, limit: float = 30.0) -> bytes:
    seen = b""
    async with asyncio.timeout(limit):
        async for chunk in chunks:
            seen += chunk.data
            if needle in seen:
                return seen
    raise AssertionError(f"{needle!r} never came; got {seen!r}")


async def test_output_streams_and_exit_code(client: AgentClient) -> None:
    async with await client.start_process(["sh", "-c", "echo out; echo err >&2; exit 3"]) as proc:
        out = await _collect(proc)
        done = await proc.wait(30)
    assert out["stdout"] == b"out\n" and out["stderr"] == b"err\n"
    assert (done.exit_code, done.signal, done.killed) == (3, None, False)
    assert proc.state is ProcessState.EXITED


async def test_stdin_is_fed_then_closed(client: AgentClient) -> None:
    proc = await client.start_process(["cat"], stdin=True)
    try:
        chunks = proc.output()
        await proc.send_input(b"hello ")
        await proc.send_input(b"world\n")
        assert await _read_until(chunks, b"hello world\n") == b"hello world\n"
        await proc.close_stdin()
        done = await proc.wait(30)
        assert done.exit_code == 0
        with pytest.raises(GuestAgentError):
            await proc.send_input(b"late")
        await chunks.aclose()  # type: ignore[attr-defined]
    finally:
        await proc.aclose()


async def test_input_without_stdin_is_refused(client: AgentClient) -> None:
    async with await client.start_process(["sleep", "30"]) as proc:
        with pytest.raises(GuestAgentError) as info:
            await proc.send_input(b"x")
        assert info.value.context["code"] == "no_stdin"


async def test_pty_runs_an_interactive_shell_and_resizes(client: AgentClient) -> None:
    proc = await client.start_process(["sh", "-i"], pty=(24, 80), env={"PS1": "$ "})
    try:
        chunks = proc.output()
        await proc.send_input(b"tty; echo $((6*7))\n")
        seen = await _read_until(chunks, b"42")
        assert b"/dev/pts/" in seen
        await proc.resize(30, 100)
        await proc.send_input(b"stty size\n")
        await _read_until(chunks, b"30 100")
        await proc.send_input(b"exit 5\n")
        assert (await proc.wait(30)).exit_code == 5
        await chunks.aclose()  # type: ignore[attr-defined]
    finally:
        await proc.aclose()


async def test_resize_without_pty_and_bad_sizes_are_refused(client: AgentClient) -> None:
    async with await client.start_process(["sleep", "30"]) as proc:
        with pytest.raises(GuestAgentError) as info:
            await proc.resize(10, 10)
        assert info.value.context["code"] == "no_pty"
        with pytest.raises(SandboxInputError):
            await proc.resize(0, 10)


async def test_bad_start_arguments_are_typed_errors(client: AgentClient) -> None:
    with pytest.raises(SandboxInputError) as info:
        await client.start_process([])
    assert info.value.context["field"] == "argv"
    with pytest.raises(GuestAgentError) as refused:
        await client.start_process(["/no/such/program"])
    assert refused.value.context["code"] == "spawn_failed"
    with pytest.raises(GuestAgentError) as nodir:
        await client.start_process(["true"], cwd="/no/such/dir")
    assert nodir.value.context["code"] == "not_found"


async def test_kill_ends_the_whole_tree(client: AgentClient, agent: RunningAgent) -> None:
    marker = str(_own_dir(agent, "tree"))
    proc = await client.start_process(
        ["sh", "-c", "setsid sleep 300 & (sleep 301 &) ; sleep 302; wait"], cwd=marker)
    try:
        for _ in range(200):  # all three sleeps running
            if len(await asyncio.to_thread(_pids_mentioning, marker)) >= 4:
                break
            await asyncio.sleep(0.05)
        assert len(await asyncio.to_thread(_pids_mentioning, marker)) >= 4
        done = await proc.kill()
        assert done is not None and done.killed and done.signal == 9
    finally:
        await proc.aclose()
    for _ in range(100):
        left = await asyncio.to_thread(_pids_mentioning, marker)
        if not left:
            break
        await asyncio.sleep(0.05)
    assert left == []


async def test_main_exit_kills_leftover_children(client: AgentClient, agent: RunningAgent) -> None:
    marker = str(_own_dir(agent, "leftover"))
    async with await client.start_process(["sh", "-c", "sleep 300 & echo started"], cwd=marker) as proc:
        out = await _collect(proc)
    assert out["stdout"] == b"started\n"
    for _ in range(100):
        if not await asyncio.to_thread(_pids_mentioning, marker):
            break
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(_pids_mentioning, marker) == []


async def test_sigterm_reaches_the_process(client: AgentClient) -> None:
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    async with await client.start_process(["sh", "-c", script]) as proc:
        chunks = proc.output()
        await _read_until(chunks, b"ready")
        await proc.signal(15)
        await _read_until(chunks, b"got-term")
        assert (await proc.wait(30)).exit_code == 7
        await chunks.aclose()  # type: ignore[attr-defined]


async def test_guest_timeout_kills_it(client: AgentClient) -> None:
    async with await client.start_process(["sleep", "300"], timeout_s=0.5) as proc:
        done = await proc.wait(30)
    assert done.timed_out and not done.killed and done.signal == 9


async def test_a_late_reader_gets_output_from_now_and_others_keep_theirs(client: AgentClient) -> None:
    script = "i=0; while [ $i -lt 40 ]; do echo line$i; i=$((i+1)); sleep 0.05; done"
    async with await client.start_process(["sh", "-c", script]) as proc:
        first = proc.output()
        await _read_until(first, b"line10\n")
        late = await _collect(proc, replay=False)
        rest = b""
        async for chunk in first:
            rest += chunk.data
    assert b"line39\n" in late["stdout"] and b"line0\n" not in late["stdout"]
    assert rest.endswith(b"line39\n")


async def test_runs_beside_execs_and_as_the_sandbox_user(client: AgentClient) -> None:
    async with await client.start_process(["sh", "-c", "id -u; sleep 300"]) as proc:
        result = await client.exec("print(6 * 7)", language="python", timeout_s=30)
        assert result.stdout == "42\n"
        chunks = proc.output()
        uid = await _read_until(chunks, b"\n")
        await chunks.aclose()  # type: ignore[attr-defined]
    assert uid.strip() == str(1000 if IS_ROOT else os.geteuid()).encode()


@pytest.mark.skipif(not IS_ROOT, reason="root processes need the agent to run as root")
async def test_root_when_asked(client: AgentClient) -> None:
    async with await client.start_process(["id", "-u"], root=True) as proc:
        assert (await _collect(proc))["stdout"] == b"0\n"


async def test_flood_nobody_reads_stays_bounded_and_blocks_nobody(client: AgentClient) -> None:
    """Attack: a background process prints 256 MiB that no reader takes. The host keeps at most the
    ring (1 MiB) plus the connection's budget; other requests on the connection keep working."""
    with RssPeak() as mem:
        proc = await client.start_process(["head", "-c", str(256 * MIB), "/dev/zero"],
                                          max_output_bytes=512 * MIB)
        try:
            for _ in range(3):
                assert (await client.exec("print('ok')", language="python", timeout_s=30)).stdout == "ok\n"
            done = await proc.wait(120)
        finally:
            await proc.aclose()
    print(f"256 MiB flood, unread: {mem}")
    assert done.exit_code == 0 and done.stdout_bytes == 256 * MIB
    assert mem.growth < 64 * MIB, str(mem)
    held = sum(len(c.data) for c in proc._ring)
    assert 0 < held <= 1 * MIB


async def test_guest_output_cap_drops_the_rest(client: AgentClient) -> None:
    head = ["head", "-c", "100000", "/dev/zero"]
    async with await client.start_process(head, max_output_bytes=1000) as proc:
        out = await _collect(proc)
        done = await proc.wait(30)
    assert len(out["stdout"]) == 1000
    assert done.truncated == ("stdout",) and done.stdout_bytes == 100000


async def _events_until(
    watch: Any, wanted: set[tuple[str, str]], limit: float = 30.0
) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    async with asyncio.timeout(limit):
        async for batch in watch:
            seen |= {(e.name, e.type) for e in batch}
            if wanted <= seen:
                return seen
    raise AssertionError(f"missing {wanted - seen}; saw {seen}")


async def test_watch_dir_reports_create_write_chmod_rename_remove(client: AgentClient,
                                                                  agent: RunningAgent) -> None:
    root = _own_dir(agent, "watched")
    watch = client.watch_dir(str(root), recursive=True)
    try:
        assert await anext(watch) == []  # the watch is in place
        await client.exec(
            "mkdir sub; echo a > f; chmod 600 f; mv f g; echo b > sub/inner; rm g",
            language="raw", cwd=str(root), timeout_s=30)
        seen = await _events_until(watch, {
            ("sub", "create"), ("f", "create"), ("f", "write"), ("f", "chmod"), ("f", "rename"),
            ("g", "create"), ("g", "remove"), ("sub/inner", "create")})
        assert all(not name.startswith("/") for name, _ in seen)
    finally:
        await watch.aclose()


async def test_watch_of_a_missing_dir_is_refused_and_a_removed_dir_ends_it(client: AgentClient,
                                                                           agent: RunningAgent) -> None:
    with pytest.raises(GuestAgentError) as info:
        await anext(client.watch_dir(str(agent.workdir / "nope")))
    assert info.value.context["code"] == "not_found"
    root = _own_dir(agent, "doomed")
    watch = client.watch_dir(str(root))
    assert await anext(watch) == []
    await client.exec(f"rmdir {root}", language="raw", timeout_s=30)
    async with asyncio.timeout(30):
        async for _batch in watch:
            pass  # ends by itself
