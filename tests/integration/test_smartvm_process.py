"""smartvm.process with real child processes: groups, sessions, parent-death signal, tails, the ladder."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from smartvm.process import ChildProcess, pid_alive, run_tool, stop_ladder

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    """Gone or a zombie: a zombie is dead, merely not reaped (by whoever its parent is now)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _wait_gone(pid: int, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_own_process_group_in_the_owners_session() -> None:
    proc = await ChildProcess.spawn(["sleep", "60"])
    try:
        assert os.getpgid(proc.pid) == proc.pid
        assert os.getpgid(proc.pid) != os.getpgid(0)
        assert os.getsid(proc.pid) == os.getsid(0)
    finally:
        assert await proc.aclose() == -signal.SIGKILL


async def test_new_session_leads_its_own_session_and_group() -> None:
    proc = await ChildProcess.spawn(["sleep", "60"], new_session=True)
    try:
        assert os.getsid(proc.pid) == proc.pid
        assert os.getpgid(proc.pid) == proc.pid
    finally:
        await proc.aclose()


async def test_tails_keep_the_last_lines_of_each_stream() -> None:
    script = "for i in $(seq 1 100); do echo out$i; echo err$i >&2; done"
    proc = await ChildProcess.spawn(["sh", "-c", script], tail_lines=3)
    assert await proc.wait() == 0
    await proc.settle_output()
    assert proc.stdout_tail() == "out98\nout99\nout100"
    assert proc.stderr_tail() == "err98\nerr99\nerr100"
    await proc.aclose()


async def test_devnull_and_a_consumer_of_the_pipe() -> None:
    got: list[bytes] = []
    readers: list[asyncio.Task[None]] = []

    async def read_all(stream: asyncio.StreamReader) -> None:
        got.append(await stream.read())

    def consume(stream: asyncio.StreamReader) -> None:
        readers.append(asyncio.create_task(read_all(stream)))

    # 4 MiB to a discarded stdout must not block; stderr goes to our own reader, not to a tail.
    script = "head -c 4194304 /dev/zero; echo to-consumer >&2"
    proc = await ChildProcess.spawn(["sh", "-c", script], stdout="devnull", stderr=consume)
    assert await proc.wait() == 0
    await asyncio.gather(*readers)
    assert got == [b"to-consumer\n"]
    assert proc.stdout_tail() == "" and proc.stderr_tail() == ""
    await proc.aclose()


async def test_env_is_passed() -> None:
    proc = await ChildProcess.spawn(["sh", "-c", 'echo "$SMARTVM_PROBE"'], env={"SMARTVM_PROBE": "v1"})
    assert await proc.wait() == 0
    await proc.settle_output()
    assert proc.stdout_tail() == "v1"
    await proc.aclose()


async def test_missing_binary_raises_oserror() -> None:
    with pytest.raises(FileNotFoundError):
        await ChildProcess.spawn(["/nonexistent/smartvm-no-such-binary"])


async def test_child_dies_when_its_owner_is_killed() -> None:
    owner_code = (
        "import asyncio\n"
        "from smartvm.process import ChildProcess\n"
        "async def main():\n"
        "    child = await ChildProcess.spawn(['sleep', '120'])\n"
        "    print(child.pid, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", owner_code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(owner.stdout.readline(), 60)
        child = int(line)
        assert not _gone(child)
        owner.kill()  # SIGKILL: the owner gets no chance to clean up
        await owner.wait()
        assert await _wait_gone(child), f"child {child} outlived its owner"
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()


async def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)  # exists even where we may not signal it
    proc = await ChildProcess.spawn(["true"])
    await proc.aclose()
    assert not pid_alive(proc.pid)


async def test_aclose_kills_the_whole_group_and_is_idempotent() -> None:
    proc = await ChildProcess.spawn(["sh", "-c", "sleep 120 & echo $!; wait"])
    deadline = time.monotonic() + 30
    while not proc.stdout_tail() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    grandchild = int(proc.stdout_tail())
    assert os.getpgid(grandchild) == proc.pid
    assert await proc.aclose() == -signal.SIGKILL
    assert await proc.aclose() == -signal.SIGKILL
    assert await _wait_gone(grandchild)
    proc.signal_group(signal.SIGTERM)  # reaped: a no-op, not an error


async def _wait_ready(proc: ChildProcess) -> None:
    """Wait until the script printed ``ready`` (its traps are installed by then)."""
    deadline = time.monotonic() + 30
    while proc.stdout_tail() != "ready" and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert proc.stdout_tail() == "ready"


async def test_ladder_graceful_step_ends_it() -> None:
    proc = await ChildProcess.spawn(
        ["sh", "-c", "trap 'exit 7' USR1; echo ready; while :; do sleep 0.05; done"]
    )
    asked: list[bool] = []

    async def graceful() -> bool:
        asked.append(True)
        proc.signal_group(signal.SIGUSR1)
        return True

    await _wait_ready(proc)
    assert await stop_ladder(proc, graceful=graceful, timeout=30.0) is True
    assert asked == [True]
    assert proc.returncode == 7
    await proc.aclose()


async def test_ladder_sigterm_when_graceful_cannot_be_sent() -> None:
    proc = await ChildProcess.spawn(["sleep", "120"])

    async def not_sent() -> bool:
        return False

    assert await stop_ladder(proc, graceful=not_sent, timeout=30.0) is True
    assert proc.returncode == -signal.SIGTERM
    await proc.aclose()


async def test_ladder_escalates_to_sigkill() -> None:
    # An ignored SIGTERM is inherited by sleep through exec: only SIGKILL ends the group.
    proc = await ChildProcess.spawn(["sh", "-c", "trap '' TERM; echo ready; sleep 120; sleep 120"])
    await _wait_ready(proc)
    assert await stop_ladder(proc, timeout=0.3) is True
    assert proc.returncode == -signal.SIGKILL
    await proc.aclose()


async def test_ladder_on_an_exited_child_does_nothing() -> None:
    proc = await ChildProcess.spawn(["true"])
    assert await proc.wait() == 0
    called: list[bool] = []

    async def graceful() -> bool:
        called.append(True)
        return True

    assert await stop_ladder(proc, graceful=graceful, timeout=1.0) is True
    assert called == []
    await proc.aclose()


async def test_run_tool_captures_both_streams_and_the_code() -> None:
    result = await run_tool(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    merged = await run_tool(["sh", "-c", "echo out; echo err >&2"], merge_stderr=True)
    assert (merged.returncode, merged.stdout, merged.stderr) == (0, b"out\nerr\n", b"")


async def test_run_tool_missing_binary() -> None:
    with pytest.raises(FileNotFoundError):
        await run_tool(["/nonexistent/smartvm-no-such-tool"])


def _our_children(comm: str) -> list[int]:
    """Pids of this process's children named ``comm``, zombies included (not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and name == comm:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(60)  # the tool never ends by itself: a missing kill hangs here
async def test_run_tool_timeout_kills_and_reaps() -> None:
    assert _our_children("sleep") == []
    with pytest.raises(TimeoutError):
        await run_tool(["sleep", "infinity"], timeout=0.5)
    assert _our_children("sleep") == []  # killed and reaped before run_tool returned


@pytest.mark.timeout(60)  # the tool never ends by itself: a missing kill hangs here
async def test_run_tool_cancelled_kills_and_reaps() -> None:
    assert _our_children("sleep") == []
    task = asyncio.create_task(run_tool(["sleep", "infinity"]))
    deadline = time.monotonic() + 30
    while not _our_children("sleep"):
        assert time.monotonic() < deadline, "the tool never started"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _our_children("sleep") == []
