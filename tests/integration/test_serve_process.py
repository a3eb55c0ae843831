"""envd's Process service on the guest's background processes, driven by the unmodified ``e2b`` SDK
(sync and async) over real HTTP on 127.0.0.1 against real microVMs: stdin, Connect, PTY, signals,
disconnects, users."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from e2b import AsyncSandbox, CommandExitException, PtySize, Sandbox

from tests.integration.serve_server import key_a_env, serve_module  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def sbx(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    request.getfixturevalue("key_a_env")  # the SDK pointed at this module's server
    sandbox = Sandbox.create()
    try:
        yield sandbox
    finally:
        sandbox.kill()


def _running(sbx: Sandbox, pattern: str) -> list[str]:
    """Guest processes whose command line matches (``ps`` from busybox, as root: it sees all)."""
    out = sbx.commands.run(f"ps -o args | grep -F '{pattern}' | grep -v grep || true", user="root").stdout
    return [line for line in out.splitlines() if line.strip()]


def test_background_stdin_send_and_close(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello ")
    sbx.commands.send_stdin(handle.pid, b"world\n")
    sbx.commands.stream_input(handle.pid, iter(["streamed ", b"input\n"]))
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert (result.stdout, result.exit_code) == ("hello world\nstreamed input\n", 0)
    assert sbx.commands.list() == []


def test_disconnect_leaves_a_background_process_and_connect_follows_it(sbx: Sandbox) -> None:
    script = "i=0; while [ $i -lt 60 ]; do echo tick$i; i=$((i+1)); sleep 0.1; done; exit 4"
    handle = sbx.commands.run(script, background=True)
    time.sleep(1.0)
    handle.disconnect()
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    again = sbx.commands.connect(handle.pid)
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == 4
    assert "tick59\n" in info.value.stdout and "tick0\n" not in info.value.stdout  # from now on
    assert sbx.commands.list() == []


def test_kill_leaves_no_guest_process(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 3001 & (sleep 3002 &); sleep 3003", background=True)
    for _ in range(100):
        if len(_running(sbx, "sleep 300")) == 3:
            break
        time.sleep(0.1)
    assert len(_running(sbx, "sleep 300")) == 3
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()
    assert _running(sbx, "sleep 300") == []
    assert sbx.commands.kill(handle.pid) is False


def test_the_guest_looks_like_e2b_user_home_bash(sbx: Sandbox) -> None:
    out = sbx.commands.run('whoami; id -u; echo $HOME; pwd; test -n "$BASH_VERSION" && echo bash').stdout
    assert out == "user\n1000\n/home/user\n/home/user\nbash\n"
    sbx.files.write("/home/user/note.txt", "from the files API")
    assert sbx.commands.run("cat note.txt").stdout == "from the files API"
    assert sbx.commands.run("ls -ld .", cwd="/home/user").stdout.split()[2] == "user"
    assert sbx.commands.run("whoami; id -u; echo $HOME", user="root").stdout == "root\n0\n/root\n"
    with pytest.raises(Exception, match="unknown user"):
        sbx.commands.run("true", user="nobody")  # type: ignore[arg-type]


def test_pty_create_input_resize_and_exit(sbx: Sandbox) -> None:
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(term.pid, b"echo $((6*7))\n")
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
    seen: list[bytes] = []
    result = term.wait(on_pty=seen.append)
    text = b"".join(seen)
    assert result.exit_code == 0
    assert b"42" in text and b"30 100" in text


def test_pty_kill(sbx: Sandbox) -> None:
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(term.pid) is True
    with pytest.raises(CommandExitException):
        term.wait()
    assert sbx.commands.list() == []


@pytest.mark.usefixtures("key_a_env")
def test_async_stdin_connect_and_pty() -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.create()
        try:
            handle = await sbx.commands.run("cat", background=True, stdin=True)
            await sbx.commands.send_stdin(handle.pid, "async in\n")
            await sbx.commands.close_stdin(handle.pid)
            result = await handle.wait()
            assert result.stdout == "async in\n"

            long = await sbx.commands.run("sleep 1; echo late; sleep 1; echo last", background=True)
            await long.disconnect()
            out: list[str] = []
            again = await sbx.commands.connect(long.pid, on_stdout=out.append)
            assert (await again.wait()).exit_code == 0
            assert "last\n" in "".join(out)

            data: list[bytes] = []
            term = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=data.append)
            await sbx.pty.send_stdin(term.pid, b"echo $((7*6))\n")
            await sbx.pty.resize(term.pid, PtySize(rows=40, cols=120))
            await sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
            assert (await term.wait()).exit_code == 0
            text = b"".join(data)
            assert b"42" in text and b"40 120" in text

            forever = await sbx.commands.run("sleep 3004", background=True, timeout=0)
            assert await sbx.commands.kill(forever.pid) is True
            assert await sbx.commands.list() == []
        finally:
            await sbx.kill()

    asyncio.run(scenario())
