"""Sessions end to end: interpreter state across execs, files, timeouts, idle close, closing.

Real guests under TCG. One module-scoped Scheduler; every test leaves no guest and no overlay.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import CommunicationOutcomeUnknownError, GuestAgentError, SandboxInputError
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError, SessionClosedError
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.sandbox.session import Session, SessionState
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests(SchedulerConfig(max_output_bytes=1024 * 1024)) as sched:
        yield sched


async def test_python_session_keeps_state_and_survives_a_timeout(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python", env_vars={"BASE": "b"}) as s:
        assert isinstance(s, Session) and s.state is SessionState.OPEN and s.exec_count == 0
        r = await s.exec("x = 41\nimport json\ndef double(v):\n    return v * 2")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "", "")
        r = await s.exec("print(x + 1, json.dumps([double(x)]))")
        assert r.stdout == "42 [82]\n"
        r = await s.exec(
            "import os\nprint(os.environ['BASE'], os.environ.get('EXTRA'))", env_vars={"EXTRA": "e"}
        )
        assert r.stdout == "b e\n"
        r = await s.exec("raise ValueError('boom')")
        assert r.exit_code != 0 and "ValueError: boom" in r.stderr
        r = await s.exec("print(x)")  # an exception does not lose the state
        assert r.stdout == "41\n"
        streamed: list[str] = []
        r = await s.exec(
            "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)",
            on_stdout=streamed.append,
        )
        assert "".join(streamed) == r.stdout == "0\n1\n2\n"
        r = await s.exec("while True: pass", timeout_seconds=2)
        assert r.timed_out and r.exit_code == -1
        assert "[sandbox] execution timed out after 2s" in r.stderr and "state was lost" in r.stderr
        r = await s.exec("print('usable', 'x' in globals())")
        assert r.stdout == "usable False\n"
        assert s.exec_count == 8
    assert s.closed and s.close_reason == "closed"
    await s.close()  # idempotent
    with pytest.raises(SessionClosedError) as info:
        await s.exec("print(1)")
    assert info.value.context["reason"] == "closed"
    await assert_no_vms(scheduler)


async def test_raw_session_keeps_env_and_cwd_and_moves_files(scheduler: Scheduler, tmp_path: Path) -> None:
    big = secrets.token_bytes(3 * 1024 * 1024 + 17)  # several chunks
    local = tmp_path / "big.bin"
    local.write_bytes(big)
    async with await scheduler.session(language="raw") as s:
        await s.exec("export GREETING=hi; mkdir -p work/deeper; cd work")
        r = await s.exec('echo "$GREETING $(pwd)"')
        assert r.stdout == "hi /home/sandbox/work\n"

        await s.write_file("in/bytes.txt", b"from bytes")
        await s.write_file("in/big.bin", local)
        await s.write_file("in/stream.txt", io.BytesIO(b"from a file object"))
        await s.write_file("tool.sh", b"#!/bin/sh\necho tool ran\n", make_executable=True)
        r = await s.exec("cd /home/sandbox && ./tool.sh && sha256sum in/big.bin && cat in/stream.txt")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.splitlines() == [
            "tool ran",
            f"{hashlib.sha256(big).hexdigest()}  in/big.bin",
            "from a file object",
        ]
        entries = {e.name: e for e in await s.list_files("in")}
        assert set(entries) == {"bytes.txt", "big.bin", "stream.txt"}
        assert entries["big.bin"].size == len(big) and not entries["big.bin"].is_dir
        top = {e.name: e.is_dir for e in await s.list_files()}
        assert top["in"] is True and top["work"] is True and top["tool.sh"] is False

        assert await s.read_file("in/bytes.txt") == b"from bytes"
        target = tmp_path / "back.bin"
        assert await s.read_file("/home/sandbox/in/big.bin", target) is None
        assert target.read_bytes() == big
        sink = io.BytesIO()
        await s.read_file("in/stream.txt", sink)
        assert sink.getvalue() == b"from a file object"

        for bad in ("../etc/passwd", "/etc/passwd", "a\x00b", ""):
            with pytest.raises(SandboxInputError):
                await s.read_file(bad)
        with pytest.raises(SandboxInputError):
            await s.write_file("/tmp/x", b"outside")
        with pytest.raises(GuestAgentError):
            await s.read_file("does/not/exist")
        assert (await s.exec("echo still fine")).stdout == "still fine\n"
    await assert_no_vms(scheduler)


async def test_javascript_session_state_and_close_while_running(scheduler: Scheduler) -> None:
    s = await scheduler.session(language="javascript")
    try:
        await s.exec("var total = 40; function add(a) { total += a; return total; }")
        r = await s.exec("console.log(add(2))")
        assert r.stdout == "42\n"
        async with s.exclusive() as vm:
            assert vm.vm_id == s.vm_id
            waiting = asyncio.create_task(s.exec("console.log(add(1))"))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "an exec must wait while the session is held exclusively"
        assert (await waiting).stdout == "43\n"
        started = asyncio.Event()
        running = asyncio.create_task(
            s.exec(
                "console.log('spin'); while (true) {}", timeout_seconds=300, on_stdout=lambda _: started.set()
            )
        )
        await asyncio.wait_for(started.wait(), 60)
        await s.close()
        with pytest.raises(CommunicationOutcomeUnknownError) as info:
            await running
        assert info.value.context["reason"] == "closed"
    finally:
        await s.close()
    assert scheduler.active_sessions == 0
    await assert_no_vms(scheduler)


async def test_idle_session_closes_itself_and_frees_capacity(scheduler: Scheduler) -> None:
    s = await scheduler.session(language="python", idle_timeout_seconds=1.5)
    assert scheduler.admission.stats().active == 1
    assert (
        await s.exec("print('busy longer than the idle timeout') or __import__('time').sleep(2.5)")
    ).exit_code == 0
    assert not s.closed, "an exec in progress must not count as idle"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not s.closed and loop.time() < deadline:
        await asyncio.sleep(0.1)
    assert s.closed and s.close_reason == "idle_timeout"
    with pytest.raises(SessionClosedError) as info:
        await s.exec("print(1)")
    assert info.value.context["reason"] == "idle_timeout"
    await s.close()  # waits for the idle close already under way; the reason stays
    assert s.close_reason == "idle_timeout"
    assert scheduler.admission.stats().active == 0
    assert scheduler.active_sessions == 0
    await assert_no_vms(scheduler)


async def test_scheduler_close_closes_sessions() -> None:
    async with scheduler_for_tests() as sched:
        s = await sched.session(language="raw")
        assert (await s.exec("echo up")).stdout == "up\n"
        started = asyncio.Event()
        running = asyncio.create_task(
            s.exec("echo go; sleep 100", timeout_seconds=300, on_stdout=lambda _: started.set())
        )
        await asyncio.wait_for(started.wait(), 60)
        opening = asyncio.create_task(sched.session(language="raw"))
        await asyncio.sleep(0.3)  # the second session is booting (or, on a fast host, open)
    assert s.closed and s.close_reason == "scheduler_closed"
    with pytest.raises(CommunicationOutcomeUnknownError) as info:
        await running
    assert info.value.context["reason"] == "scheduler_closed"
    try:
        late = await opening
    except SchedulerClosedError:
        pass
    else:
        assert late.closed and late.close_reason == "scheduler_closed"
    with pytest.raises(SessionClosedError):
        await s.list_files()


async def test_an_exec_cancelled_right_after_it_was_sent_does_not_hold_the_session(
    scheduler: Scheduler,
) -> None:
    """The cancel can reach the agent before the exec is registered there; it must still stop it."""
    async with await scheduler.session(language="python") as s:
        assert (await s.exec("print(0)")).stdout == "0\n"
        task = asyncio.create_task(s.exec("import time; time.sleep(30)", timeout_seconds=60))
        for _ in range(5):  # let the request go out, then cancel at once (no wall-clock sleep)
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            r = await s.exec("print(1)")
        assert r.stdout == "1\n", r.stderr
    await assert_no_vms(scheduler)
