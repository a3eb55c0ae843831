"""``sbx serve`` driven by the unmodified ``e2b`` and ``e2b-code-interpreter`` SDKs over real HTTP on
127.0.0.1, against real microVMs (QEMU under TCG). The SDKs are pointed at the server with the three
environment variables ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``E2B_API_KEY``.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b_code_interpreter import AsyncSandbox as AsyncCodeSandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.integration.serve_server import KEY_A, KEY_B, RunningServer, running_server, sdk_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server() as srv:
        yield srv


@pytest.fixture
def key_a(server: RunningServer) -> Iterator[str]:
    with sdk_env(server.url, KEY_A):
        yield server.url


def test_sync_sandbox_commands_and_files(key_a: str) -> None:
    sbx = Sandbox.create(metadata={"who": "test"}, envs={"GREETING": "hello"})
    try:
        assert sbx.is_running()
        chunks: list[str] = []
        result = sbx.commands.run(
            'echo "$GREETING $WHO"; echo oops >&2; pwd', envs={"WHO": "world"}, on_stdout=chunks.append
        )
        assert result.exit_code == 0
        assert result.stdout == "hello world\n/home/user\n"
        assert result.stderr == "oops\n"
        assert "".join(chunks) == result.stdout  # streamed as it ran
        with pytest.raises(CommandExitException) as exc_info:
            sbx.commands.run("echo partial; exit 3")
        assert exc_info.value.exit_code == 3 and exc_info.value.stdout == "partial\n"
        # cd in one command does not leak into the next; cwd= is honoured
        sbx.commands.run("mkdir -p sub && cd sub && touch inside")
        assert sbx.commands.run("pwd").stdout == "/home/user\n"
        assert sbx.commands.run("ls", cwd="/home/user/sub").stdout == "inside\n"

        info = sbx.files.write("/home/user/notes/a.txt", "some text")
        assert info.path == "/home/user/notes/a.txt"
        assert sbx.files.read("notes/a.txt") == "some text"
        assert bytes(sbx.files.read("/home/user/notes/a.txt", format="bytes")) == b"some text"
        assert sbx.commands.run("cat notes/a.txt").stdout == "some text"
        names = {e.name for e in sbx.files.list("/home/user")}
        assert {"notes", "sub"} <= names
        assert sbx.files.make_dir("made/deep") is True
        assert sbx.files.exists("made/deep") and not sbx.files.exists("nope")
        entry = sbx.files.get_info("notes/a.txt")
        assert entry.size == len("some text") and entry.type is not None and entry.type.value == "file"
        moved = sbx.files.rename("notes/a.txt", "notes/b.txt")
        assert moved.name == "b.txt"
        sbx.files.remove("made")
        assert not sbx.files.exists("made")
        with pytest.raises(NotFoundException):
            sbx.files.read("does-not-exist.txt")
        blob = os.urandom(3 * 1024 * 1024)
        sbx.files.write("big.bin", io.BytesIO(blob))  # a file object: streamed octet-stream upload
        assert bytes(sbx.files.read("big.bin", format="bytes")) == blob
        assert b"".join(sbx.files.read("big.bin", format="stream")) == blob

        listed = [s.sandbox_id for s in Sandbox.list().next_items()]
        assert sbx.sandbox_id in listed
        got = sbx.get_info()
        assert got.sandbox_id == sbx.sandbox_id and got.metadata == {"who": "test"}
    finally:
        sbx.kill()
    assert Sandbox.kill(sbx.sandbox_id) is False  # already gone: 404
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_command_timeout_kills_the_command_and_frees_the_shell(key_a: str) -> None:
    sbx = Sandbox.create()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutException):
            sbx.commands.run("echo started; sleep 60", timeout=2)
        assert sbx.commands.run("echo after").stdout == "after\n"
        assert time.monotonic() - t0 < 30  # the sleep was killed, not waited for
    finally:
        sbx.kill()


def test_background_command_is_listed_then_waited_for(key_a: str) -> None:
    sbx = Sandbox.create()
    try:
        handle = sbx.commands.run("sleep 1; echo done", background=True)
        assert handle.pid in [p.pid for p in sbx.commands.list()]
        result = handle.wait()
        assert result.stdout == "done\n" and result.exit_code == 0
        assert sbx.commands.list() == []
        # kill(): the guest kills the command's process tree; the shell is free at once
        t0 = time.monotonic()
        long = sbx.commands.run("sleep 60", background=True)
        # commands run side by side: the sleeping one does not hold the others up
        assert sbx.commands.run("echo beside").stdout == "beside\n"
        assert sbx.commands.kill(long.pid) is True
        with pytest.raises(CommandExitException):
            long.wait()
        assert sbx.commands.run("echo next").stdout == "next\n"
        assert time.monotonic() - t0 < 30
        assert sbx.commands.kill(999999) is False
        # A client that goes away: its command is killed too, the shell does not stay taken.
        t0 = time.monotonic()
        orphan = sbx.commands.run("sleep 60", background=True)
        orphan.disconnect()
        assert sbx.commands.run("echo free").stdout == "free\n"
        assert time.monotonic() - t0 < 30
    finally:
        sbx.kill()


def test_async_sandbox(key_a: str) -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.create()
        try:
            out: list[str] = []
            result = await sbx.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=out.append)
            assert result.stdout == "line1\nline2\nline3\n" and "".join(out) == result.stdout
            await sbx.files.write("x.bin", b"\x00\x01\xff")
            assert bytes(await sbx.files.read("x.bin", format="bytes")) == b"\x00\x01\xff"
            assert [e.name for e in await sbx.files.list(".")] == ["x.bin"]
            same = await AsyncSandbox.connect(sbx.sandbox_id)
            assert (await same.commands.run("ls")).stdout == "x.bin\n"
        finally:
            await sbx.kill()

    asyncio.run(scenario())


def test_code_interpreter_state_results_errors_and_contexts(key_a: str) -> None:
    sbx = CodeSandbox.create()
    try:
        streamed: list[str] = []
        first = sbx.run_code("x = 41\nprint('hi')\nx + 1", on_stdout=lambda m: streamed.append(m.line))
        assert first.logs.stdout == ["hi\n"] and streamed == ["hi\n"]
        assert first.text == "42"
        assert sbx.run_code("x").text == "41"  # state kept between calls
        partial = sbx.run_code("print('no newline', end='')\nx")
        assert partial.text == "41" and "".join(partial.logs.stdout) == "no newline"
        failed = sbx.run_code("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
        assert "division by zero" in failed.error.value
        js = sbx.run_code("let y = 5; console.log(y * 2)", language="javascript")
        assert js.logs.stdout == ["10\n"]
        assert sbx.run_code("console.log(y + 1)", language="javascript").logs.stdout == ["6\n"]

        ctx = sbx.create_code_context(language="python")
        assert ctx.id in {c.id for c in sbx.list_code_contexts()}
        missing = sbx.run_code("x", context=ctx)  # a fresh context has its own state
        assert missing.error is not None and missing.error.name == "NameError"
        sbx.run_code("z = 7", context=ctx)
        sbx.restart_code_context(ctx)
        assert sbx.run_code("z", context=ctx).error is not None  # restarted: state gone
        sbx.remove_code_context(ctx)
        assert ctx.id not in {c.id for c in sbx.list_code_contexts()}
    finally:
        sbx.kill()


def test_code_interpreter_async(key_a: str) -> None:
    async def scenario() -> None:
        sbx = await AsyncCodeSandbox.create()
        try:
            await sbx.run_code("import math\nr = 2")
            result = await sbx.run_code("math.pi * r")
            assert result.text is not None and result.text.startswith("6.28")
        finally:
            await sbx.kill()

    asyncio.run(scenario())


def test_keys_are_isolated_and_checked(server: RunningServer) -> None:
    with sdk_env(server.url, KEY_A):
        sbx = Sandbox.create()
    try:
        with sdk_env(server.url, KEY_B):
            assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]
            with pytest.raises(NotFoundException):
                Sandbox.get_info(sbx.sandbox_id)
            with pytest.raises(SandboxException):
                Sandbox.connect(sbx.sandbox_id)
            assert Sandbox.kill(sbx.sandbox_id) is False
            with pytest.raises(NotFoundException):
                Sandbox.set_timeout(sbx.sandbox_id, 1)
        with sdk_env(server.url, KEY_A):
            assert Sandbox.get_info(sbx.sandbox_id).sandbox_id == sbx.sandbox_id  # still alive
        # Raw HTTP: E2B's error shape; no key / a bad key is 401; the daemon wants the access token.
        r = httpx.get(server.url + "/v2/sandboxes")
        assert r.status_code == 401 and r.json()["code"] == 401 and r.json()["message"]
        r = httpx.get(server.url + f"/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": KEY_B})
        assert r.status_code == 404 and r.json() == {"code": 404, "message": r.json()["message"]}
        r = httpx.delete(server.url + f"/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": KEY_B})
        assert r.status_code == 404
        daemon = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        bad = {**daemon, "X-Access-Token": "bad"}
        r = httpx.get(server.url + "/files", params={"path": "x"}, headers=bad)
        assert r.status_code == 401
        r = httpx.post(
            server.url + "/process.Process/List",
            json={},
            headers={**daemon, "Content-Type": "application/json"},
        )
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
        with sdk_env(server.url, "not-a-key"), pytest.raises(AuthenticationException):
            Sandbox.create()
    finally:
        sbx.kill()


def test_v2_list_is_paginated(key_a: str) -> None:
    boxes = [Sandbox.create(metadata={"batch": "p"}) for _ in range(2)]
    try:
        pager = Sandbox.list(limit=1, query=None)
        seen: list[str] = []
        while pager.has_next:
            page = pager.next_items()
            assert len(page) <= 1
            seen += [s.sandbox_id for s in page]
        assert {b.sandbox_id for b in boxes} <= set(seen)
    finally:
        for b in boxes:
            b.kill()


def test_sandbox_dies_at_its_deadline(key_a: str) -> None:
    sbx = Sandbox.create(timeout=3)
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    sbx.set_timeout(2)  # shortening is allowed, as in E2B
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            Sandbox.get_info(sbx.sandbox_id)
        except NotFoundException:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the sandbox outlived its timeout")
    assert not sbx.is_running()


def test_quota_per_key_is_429(server: RunningServer) -> None:
    limits = {"max_sandboxes_per_key": 1, "max_memory_mb_per_key": 512}
    with running_server(**limits) as small, sdk_env(small.url, KEY_A):
        first = CodeSandbox.create()  # 256 MiB
        try:
            with pytest.raises(RateLimitException):
                Sandbox.create()
            assert first.run_code("1 + 1").text == "2"  # + a 256 MiB Python context: 512 MiB
            with pytest.raises(SandboxException, match="429"):  # a JavaScript context would pass 512 MiB
                first.run_code("1", language="javascript")
            with sdk_env(small.url, KEY_B):  # quotas are per key
                other = Sandbox.create()
                other.kill()
        finally:
            first.kill()
        Sandbox.create().kill()  # the slot is free again


def test_bad_input_gets_e2b_errors_not_tracebacks(server: RunningServer) -> None:
    key = {"X-API-KEY": KEY_A}
    r = httpx.post(server.url + "/v2/sandboxes", content=b"{not json", headers=key)
    assert r.status_code == 400 and r.json()["code"] == 400
    r = httpx.post(server.url + "/v2/sandboxes", json={"templateID": "no-such-template"}, headers=key)
    assert r.status_code == 404 and "template" in r.json()["message"]
    r = httpx.post(server.url + "/v2/sandboxes", json={"timeout": "soon"}, headers=key)
    assert r.status_code == 400
    r = httpx.get(server.url + "/no/such/route", headers=key)
    assert r.status_code == 404 and r.json() == {"code": 404, "message": "Not Found"}
    r = httpx.patch(server.url + "/v2/sandboxes", headers=key)
    assert r.status_code == 405 and r.json()["code"] == 405
    # A daemon request for a sandbox that does not exist: 502, as E2B's proxy answers.
    gone = {"E2b-Sandbox-Id": "inope", "E2b-Sandbox-Port": "49983", "X-Access-Token": "x"}
    assert httpx.get(server.url + "/health", headers=gone).status_code == 502


def test_upload_cap_and_paths_outside_home(server: RunningServer) -> None:
    with running_server(max_upload_bytes=64 * 1024) as small, sdk_env(small.url, KEY_A):
        sbx = Sandbox.create()
        try:
            with pytest.raises(SandboxException):
                sbx.files.write("big.bin", b"x" * (100 * 1024))
            with pytest.raises(SandboxException):
                sbx.files.write("/etc/evil", "no")
            sbx.files.write("ok.bin", b"y" * 1024)
            assert len(bytes(sbx.files.read("ok.bin", format="bytes"))) == 1024
            # Malformed Connect request: a Connect error, not a 500.
            r = httpx.post(
                small.url + "/process.Process/Start",
                content=b"\x00\x00\x00\x00\x05garbage",
                headers={
                    "E2b-Sandbox-Id": sbx.sandbox_id,
                    "E2b-Sandbox-Port": "49983",
                    "X-Access-Token": sbx._envd_access_token or "",
                    "Content-Type": "application/connect+proto",
                },
            )
            assert r.status_code != 500 and "Traceback" not in r.text
        finally:
            sbx.kill()


def test_pause_then_connect_resumes_with_state(key_a: str) -> None:
    sbx = CodeSandbox.create()
    try:
        sbx.run_code("kept = 'still here'")
        sbx.files.write("f.txt", "file survives")
        sbx.pause()
        info = Sandbox.get_info(sbx.sandbox_id)
        assert info.state.value == "paused"
        query = SandboxQuery(state=[SandboxState.PAUSED])
        paused_ids = [s.sandbox_id for s in Sandbox.list(query=query).next_items()]
        assert sbx.sandbox_id in paused_ids
        assert not sbx.is_running()  # the daemon does not answer while paused
        resumed = CodeSandbox.connect(sbx.sandbox_id)
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
        assert resumed.run_code("kept").text == "'still here'"
        assert resumed.files.read("f.txt") == "file survives"
        resumed.pause()  # and a paused sandbox can be killed
    finally:
        sbx.kill()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
