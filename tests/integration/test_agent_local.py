"""The real guest agent, run on the host as a subprocess over a unix socket, driven by AgentClient.

The agent listens on a unix socket (like QEMU's virtio-serial chardev server); the client connects to
it. As root, user code runs as uid/gid 1000 exactly as in the guest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exec_sandbox.client.agent import AgentClient, AgentClientState
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    SandboxInputError,
)
from exec_sandbox.protocol import agent as ap
from exec_sandbox.protocol.agent import ExitEvent, Language, OutputEvent

pytestmark = pytest.mark.integration

AGENT = ap.GUEST_AGENT_PATH
IS_ROOT = os.geteuid() == 0
USER_UID = 1000 if IS_ROOT else os.geteuid()
HAVE_NODE = shutil.which("node") is not None


@dataclass
class RunningAgent:
    proc: asyncio.subprocess.Process
    socket: Path
    workdir: Path
    base: Path


def _alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (text in cmd or cwd.startswith(text)) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _make_dirs() -> tuple[Path, Path, Path]:
    base = Path(tempfile.mkdtemp(prefix="sbx-agent-test-", dir="/tmp"))
    base.chmod(0o711)  # uid 1000 must reach the work dir (search only: nobody may list it)
    workdir = base / "work"
    workdir.mkdir()
    rundir = base / "run"
    rundir.mkdir()
    if IS_ROOT:
        os.chown(workdir, 1000, 1000)
    return base, workdir, rundir


@contextlib.asynccontextmanager
async def run_agent(*extra: str) -> AsyncIterator[RunningAgent]:
    base, workdir, rundir = await asyncio.to_thread(_make_dirs)
    sock = base / "agent.sock"
    privs = ["--run-as-uid", "1000", "--run-as-gid", "1000"] if IS_ROOT else ["--no-drop-privileges"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(AGENT), "--unix-listen", str(sock), "--workdir", str(workdir),
        "--rundir", str(rundir), *privs, *extra,
    )
    try:
        for _ in range(3000):  # the agent creates its listening socket right after start
            if await asyncio.to_thread(sock.exists) or proc.returncode is not None:
                break
            await asyncio.sleep(0.01)
        yield RunningAgent(proc, sock, workdir, base)
    finally:
        if proc.returncode is None:
            proc.terminate()  # the agent kills what it started, then exits
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
        await proc.wait()
        # Nothing the agent started may outlive it (code files live under base/run, cwd is base/work).
        leftovers = await asyncio.to_thread(_pids_mentioning, str(base))
        for _ in range(100):  # interpreters orphaned by a SIGKILLed agent exit on their own (pipe EOF)
            if not leftovers:
                break
            await asyncio.sleep(0.05)
            leftovers = await asyncio.to_thread(_pids_mentioning, str(base))
        for pid in leftovers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        assert leftovers == [], f"processes left behind: {leftovers}"


SPARE_ARGS = ["--spare", "python", *(["--spare", "javascript"] if HAVE_NODE else [])]


@pytest.fixture(params=["cold", "spare"])
async def agent(request: pytest.FixtureRequest) -> AsyncIterator[RunningAgent]:
    """Every agent test runs twice: one-shot execs starting interpreters cold, and from spares."""
    async with run_agent(*(SPARE_ARGS if request.param == "spare" else [])) as running:
        yield running


@pytest.fixture
async def client(agent: RunningAgent) -> AsyncIterator[AgentClient]:
    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as c:
        await c.wait_ready(timeout=30)
        yield c


# ---------------------------------------------------------------------- readiness


async def test_hello_and_ping(client: AgentClient, agent: RunningAgent) -> None:
    assert client.state is AgentClientState.READY
    hello = client.hello
    assert hello is not None
    assert hello.protocol_version == ap.PROTOCOL_VERSION
    assert {"python", "raw"} <= set(hello.languages)
    assert hello.pid == agent.proc.pid
    assert Path(hello.workdir) == agent.workdir.resolve()
    again = await client.ping()
    assert again.instance == hello.instance and again.id is not None


async def test_agent_announces_hello_on_every_connection(agent: RunningAgent) -> None:
    instances = []
    for _ in range(2):
        reader, writer = await asyncio.open_unix_connection(str(agent.socket))
        try:
            decoder = ap.FrameDecoder()
            payloads: list[bytes] = []
            while not payloads:
                data = await asyncio.wait_for(reader.read(65536), 30)
                assert data, "agent closed the connection"
                payloads = decoder.feed(data)
            hello = ap.parse_guest_message(payloads[0])
            assert isinstance(hello, ap.Hello) and hello.id is None  # unsolicited
            instances.append(hello.instance)
        finally:
            writer.close()
            await writer.wait_closed()
    assert instances[0] == instances[1]


async def test_host_reconnect_gets_hello_again_and_works(agent: RunningAgent) -> None:
    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as first:
        hello1 = await first.wait_ready(timeout=30)
        assert (await first.exec("print('one')", language="python")).stdout == "one\n"
    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as second:
        hello2 = await second.wait_ready(timeout=30)
        assert hello2.instance == hello1.instance
        assert (await second.exec("print('two')", language="python")).stdout == "two\n"


# ---------------------------------------------------------------------- exec


async def test_python_print(client: AgentClient) -> None:
    result = await client.exec("print(1+1)", language="python")
    assert result.stdout == "2\n"
    assert result.stderr == ""
    assert result.exit_code == 0 and not result.timed_out


async def test_user_code_runs_unprivileged(client: AgentClient) -> None:
    result = await client.exec("import os; print(os.getuid(), os.getgid(), os.getcwd())",
                               language="python")
    uid, gid, cwd = result.stdout.split()
    assert int(uid) == USER_UID and int(gid) == USER_UID
    assert client.hello is not None and cwd == client.hello.workdir


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run user code as another uid")
async def test_user_code_cannot_kill_the_agent(client: AgentClient, agent: RunningAgent) -> None:
    code = f"import os, signal\ntry:\n    os.kill({agent.proc.pid}, signal.SIGKILL)\n"
    code += "except PermissionError:\n    print('denied')\n"
    result = await client.exec(code, language="python")
    assert result.stdout == "denied\n"
    assert agent.proc.returncode is None
    assert (await client.ping()).pid == agent.proc.pid


async def test_one_shot_runs_are_fresh_processes(client: AgentClient) -> None:
    first = await client.exec("import os\nx = 1\nprint(os.getpid())", language="python")
    second = await client.exec("import os\nprint(os.getpid(), 'x' in globals())", language="python")
    pid, seen = second.stdout.split()
    assert pid != first.stdout.strip() and seen == "False"


async def test_spare_interpreters_serve_one_shot_runs(client: AgentClient) -> None:
    langs: list[Language] = ["python", "javascript"] if HAVE_NODE else ["python"]
    warm = await client.warmup(langs, session=False, spare=True)
    assert sorted(warm.ready) == sorted(langs)
    assert (await client.ping()).boot.spares == sorted(langs)
    # The driver runs the code (argv is -c / -e), with one-shot semantics all the same.
    py = await client.exec("import sys, os\nprint(sys.argv[0])\nos._exit(4)", language="python")
    assert (py.stdout, py.exit_code) == ("-c\n", 4)
    py = await client.exec("import sys\nprint('x' in globals())\nsys.exit(3)", language="python")
    assert (py.stdout, py.exit_code) == ("False\n", 3)
    py = await client.exec("x = 1\nraise KeyError('k')", language="python", env={"A": "b"})
    assert py.exit_code == 1 and "KeyError: 'k'" in py.stderr
    if HAVE_NODE:
        js = await client.exec("console.log(typeof x); var x = 1; process.exit(5)", language="javascript")
        assert (js.stdout, js.exit_code) == ("undefined\n", 5)


async def test_stderr_and_exit_codes(client: AgentClient) -> None:
    py = await client.exec("import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)", language="python")
    assert (py.stdout, py.stderr, py.exit_code) == ("", "oops\n", 3)
    sh = await client.exec("echo out; echo err >&2; exit 7", language="raw")
    assert (sh.stdout, sh.stderr, sh.exit_code) == ("out\n", "err\n", 7)
    exc = await client.exec("raise ValueError('bad')", language="python")
    assert exc.exit_code == 1 and "ValueError: bad" in exc.stderr


async def test_env_and_cwd(client: AgentClient, agent: RunningAgent) -> None:
    await client.write_file("sub/marker.txt", b"m")
    result = await client.exec(
        "import os; print(os.environ['GREETING'], os.path.basename(os.getcwd()), os.listdir('.'))",
        language="python", env={"GREETING": "hello"}, cwd="sub",
    )
    assert result.stdout == "hello sub ['marker.txt']\n"
    with pytest.raises(GuestAgentError, match="path_refused"):
        await client.exec("print(1)", language="python", cwd="../")


async def test_invalid_exec_arguments_are_input_errors(client: AgentClient) -> None:
    with pytest.raises(SandboxInputError, match="env"):
        await client.exec("print(1)", language="python", env={"BAD NAME": "x"})
    with pytest.raises(SandboxInputError, match="language"):
        await client.exec("print(1)", language="cobol")  # type: ignore[arg-type]
    # Under the code cap, but JSON-escaped it would not fit one frame.
    with pytest.raises(SandboxInputError, match="too large"):
        await client.exec("#" + "\x01" * (ap.MAX_CODE_BYTES - 1), language="python")
    assert (await client.exec("print('fine')", language="python")).stdout == "fine\n"


async def test_output_is_streamed_in_order_before_exit(client: AgentClient) -> None:
    code = "import time\nfor i in range(4):\n    print(i, flush=True)\n    time.sleep(0.3)\n"
    events: list[OutputEvent | ExitEvent] = []
    async for event in client.exec_events(code, language="python"):
        events.append(event)
    assert isinstance(events[-1], ExitEvent) and events[-1].exit_code == 0
    outputs = [e for e in events[:-1] if isinstance(e, OutputEvent)]
    assert len(outputs) == len(events) - 1
    assert len(outputs) >= 4  # separate events, not one blob at the end
    assert "".join(o.data for o in outputs) == "0\n1\n2\n3\n"


async def test_callbacks_receive_output_and_a_failing_callback_is_harmless(client: AgentClient) -> None:
    seen_out: list[str] = []
    seen_err: list[str] = []

    def on_stdout(data: str) -> None:
        seen_out.append(data)
        raise RuntimeError("callback bug")

    async def on_stderr(data: str) -> None:
        seen_err.append(data)

    result = await client.exec("import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr)",
                               language="python", on_stdout=on_stdout, on_stderr=on_stderr)
    assert result.exit_code == 0 and result.stdout == "a\n"
    assert "".join(seen_out) == "a\n" and "".join(seen_err) == "b\n"


async def test_concurrent_requests_are_multiplexed(client: AgentClient) -> None:
    codes = [f"import time\ntime.sleep(0.{i})\nprint({i})" for i in range(4)]
    results = await asyncio.gather(
        *(client.exec(code, language="python") for code in codes), client.ping(), client.list_files(".")
    )
    assert [r.stdout for r in results[:4]] == [f"{i}\n" for i in range(4)]


async def test_timeout_kills_the_whole_process_tree(client: AgentClient, agent: RunningAgent) -> None:
    pidfile = agent.workdir / "pids.txt"
    code = f"""
import os, subprocess, sys, time
inner = "import subprocess, time; subprocess.Popen(['sleep', '301']); time.sleep(300)"
kids = [subprocess.Popen(["sleep", "300"]),
        subprocess.Popen([sys.executable, "-c", inner]),
        subprocess.Popen(["sleep", "302"], start_new_session=True)]
time.sleep(1)
with open({str(pidfile)!r}, "w") as fh:
    fh.write(" ".join(str(p) for p in [os.getpid()] + [k.pid for k in kids]))
print("spawned", flush=True)
time.sleep(300)
"""
    result = await client.exec(code, language="python", timeout_s=4)
    assert result.timed_out and result.exit_code == -1
    assert "spawned" in result.stdout
    assert "timed out" in result.stderr
    pids = [int(p) for p in (await asyncio.to_thread(pidfile.read_text)).split()]
    grandchildren = _pids_mentioning("sleep 301")
    assert len(pids) == 4
    assert [p for p in pids if _alive(p)] == []
    assert grandchildren == []
    # The agent stays usable.
    assert (await client.exec("print('still here')", language="python")).stdout == "still here\n"


async def test_output_caps_truncate_and_keep_draining(client: AgentClient) -> None:
    code = "import sys\nsys.stdout.write('x' * 1_000_000)\nsys.stderr.write('y' * 50)\n"
    code += "print('end', file=sys.stderr)"
    result = await client.exec(code, language="python", max_stdout_bytes=1000, max_stderr_bytes=20)
    assert result.exit_code == 0
    assert result.stdout == "x" * 1000 and result.stdout_truncated
    assert result.stdout_bytes == 1_000_000
    assert result.stderr == "y" * 20 and result.stderr_truncated
    assert result.stderr_bytes == 54


async def test_raw_shell(client: AgentClient) -> None:
    result = await client.exec("echo hello; printf '%s\\n' \"$HOME\"", language="raw")
    assert client.hello is not None
    assert result.stdout == f"hello\n{client.hello.workdir}\n"


@pytest.mark.skipif(not HAVE_NODE, reason="node is not installed on this host")
async def test_javascript(client: AgentClient) -> None:
    result = await client.exec("console.log(1 + 1); console.error('e'); process.exit(4)",
                               language="javascript")
    assert (result.stdout, result.stderr, result.exit_code) == ("2\n", "e\n", 4)


# ---------------------------------------------------------------------- sessions


async def test_python_session_keeps_state(client: AgentClient) -> None:
    warm = await client.warmup(["python"])
    assert warm.ready == ["python"]
    steps = [
        ("import math\nx = 41\ndef f(v):\n    return v + 1", ""),
        ("print(f(x), math.floor(2.5))", "42 2\n"),
        ("import os\nos.chdir('/tmp')\nos.environ['K'] = 'v'", ""),
        ("import os\nprint(os.getcwd(), os.environ['K'])", "/tmp v\n"),
    ]
    for code, expected in steps:
        result = await client.exec(code, language="python", session=True)
        assert (result.stdout, result.exit_code) == (expected, 0), result.stderr
    err = await client.exec("1/0", language="python", session=True)
    assert err.exit_code == 1 and "ZeroDivisionError" in err.stderr and "1/0" in err.stderr
    exited = await client.exec("raise SystemExit(5)", language="python", session=True)
    assert exited.exit_code == 5 and not exited.session_reset
    assert (await client.exec("print(x)", language="python", session=True)).stdout == "41\n"


async def test_raw_session_keeps_env_and_cwd(client: AgentClient) -> None:
    first = await client.exec("export FOO=bar; cd /tmp; BAZ=1", language="raw", session=True)
    assert first.exit_code == 0, first.stderr
    second = await client.exec("echo $FOO $BAZ; pwd; false", language="raw", session=True)
    assert (second.stdout, second.exit_code) == ("bar 1\n/tmp\n", 1)
    syntax = await client.exec("if then fi", language="raw", session=True)
    assert syntax.exit_code != 0 and not syntax.session_reset
    assert (await client.exec("echo $FOO", language="raw", session=True)).stdout == "bar\n"
    exited = await client.exec("exit 3", language="raw", session=True)
    assert exited.exit_code == 3 and exited.session_reset
    assert (await client.exec("echo \"[$FOO]\"", language="raw", session=True)).stdout == "[]\n"


@pytest.mark.skipif(not HAVE_NODE, reason="node is not installed on this host")
async def test_javascript_session_keeps_state(client: AgentClient) -> None:
    steps = [
        ("let x = 41; const os = require('os'); function f(v) { return v + 1; }", ""),
        ("console.log(f(x), typeof os.cpus)", "42 function\n"),
        ("await_me = new Promise(r => setTimeout(() => { console.log('later'); r(); }, 100)); await_me",
         "later\n"),
    ]
    for code, expected in steps:
        result = await client.exec(code, language="javascript", session=True)
        assert (result.stdout, result.exit_code) == (expected, 0), result.stderr
    err = await client.exec("null.boom", language="javascript", session=True)
    assert err.exit_code == 1 and "TypeError" in err.stderr
    assert (await client.exec("console.log(x)", language="javascript", session=True)).stdout == "41\n"


async def test_session_timeout_resets_state_and_stays_usable(client: AgentClient) -> None:
    await client.exec("x = 1", language="python", session=True)
    result = await client.exec("import time\nprint('busy', flush=True)\ntime.sleep(300)",
                               language="python", session=True, timeout_s=3)
    assert result.timed_out and result.exit_code == -1 and result.session_reset
    assert result.stdout == "busy\n" and "state was lost" in result.stderr
    after = await client.exec("print('x' in globals())", language="python", session=True)
    assert after.stdout == "False\n"


# ---------------------------------------------------------------------- files


async def test_ten_megabyte_round_trip_with_checksum(client: AgentClient, agent: RunningAgent,
                                                     tmp_path: Path) -> None:
    payload = secrets.token_bytes(10 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()
    written = await client.write_file("data/blob.bin", payload)
    assert (written.size, written.sha256) == (len(payload), digest)
    on_disk = agent.workdir / "data" / "blob.bin"
    assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == digest
    assert on_disk.stat().st_uid == USER_UID
    assert await client.read_file("data/blob.bin") == payload
    dest = tmp_path / "copy.bin"
    result = await client.read_file("data/blob.bin", dest)
    assert result.sha256 == digest and dest.read_bytes() == payload
    check = await client.exec(
        "import hashlib\nprint(hashlib.sha256(open('data/blob.bin', 'rb').read()).hexdigest())",
        language="python")
    assert check.stdout.strip() == digest


async def test_write_from_path_and_file_object_and_executable_flag(client: AgentClient,
                                                                   tmp_path: Path) -> None:
    src = tmp_path / "run.sh"
    src.write_bytes(b"#!/bin/sh\necho ran $1\n")
    await client.write_file("bin/run.sh", src, make_executable=True)
    with src.open("rb") as fh:
        await client.write_file("bin/plain.sh", fh)
    result = await client.exec("./bin/run.sh ok; test -x bin/plain.sh || echo notexec", language="raw")
    assert result.stdout == "ran ok\nnotexec\n"


async def test_list_files(client: AgentClient) -> None:
    await client.write_file("d/a.txt", b"12345")
    await client.write_file("d/sub/b.txt", b"")
    entries = await client.list_files("d")
    assert [(e.name, e.is_dir, e.size) for e in entries] == [("a.txt", False, 5), ("sub", True, 0)]
    assert "d" in [e.name for e in await client.list_files()]


async def test_path_escapes_are_refused(client: AgentClient, agent: RunningAgent) -> None:
    setup = await client.exec("ln -s /etc etc_link; ln -s /etc/hostname host_link; mkdir -p ok",
                              language="raw")
    assert setup.exit_code == 0, setup.stderr
    attempts = [
        client.write_file("../escape.txt", b"x"),
        client.write_file("ok/../../escape.txt", b"x"),
        client.write_file("/etc/sbx-agent-escape", b"x"),
        client.write_file("etc_link/sbx-agent-escape", b"x"),
        client.read_file("etc_link/hostname"),
        client.read_file("host_link"),
        client.read_file("/etc/hostname"),
        client.list_files("etc_link"),
        client.list_files("/"),
    ]
    for attempt in attempts:
        with pytest.raises(GuestAgentError, match="path_refused") as info:
            await attempt
        assert info.value.context["code"] == "path_refused"
    assert not await asyncio.to_thread(Path("/etc/sbx-agent-escape").exists)
    assert not await asyncio.to_thread((agent.base / "escape.txt").exists)
    with pytest.raises(GuestAgentError, match="not_found"):
        await client.read_file("missing.txt")
    # The connection is still fine after refused requests.
    assert (await client.exec("print('ok')", language="python")).stdout == "ok\n"


async def test_reseed_rng_also_reseeds_warm_interpreters(client: AgentClient) -> None:
    langs: list[Language] = ["python", "javascript"] if HAVE_NODE else ["python"]
    assert sorted((await client.warmup(langs)).ready) == sorted(langs)
    await client.exec("import random\nbefore = random.getstate()", language="python", session=True)
    result = await client.reseed_rng(secrets.token_bytes(64))
    assert result.mixed_bytes == 64
    assert result.credited_bits == (512 if IS_ROOT else 0)
    assert result.repls_reseeded == sorted(langs)
    after = await client.exec("print(random.getstate() != before)", language="python", session=True)
    assert after.stdout == "True\n"


# ---------------------------------------------------------------------- failures


async def test_agent_killed_mid_request_is_outcome_unknown(agent: RunningAgent) -> None:
    child_pid: list[int] = []
    started = asyncio.Event()
    printed: list[str] = []

    def on_stdout(data: str) -> None:
        printed.append(data)
        if "\n" in "".join(printed) and not child_pid:
            child_pid.append(int("".join(printed).split()[0]))
            started.set()

    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as c:
        await c.wait_ready(timeout=30)
        code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)"
        task = asyncio.create_task(c.exec(code, language="python", on_stdout=on_stdout))
        await asyncio.wait_for(started.wait(), 30)
        agent.proc.kill()
        with pytest.raises(CommunicationOutcomeUnknownError):
            await task
        assert c.state is AgentClientState.BROKEN
    # The orphaned user process (its agent is gone) is ours to clean up.
    with contextlib.suppress(OSError):
        os.kill(child_pid[0], signal.SIGKILL)
    for _ in range(1000):
        if not await asyncio.to_thread(_alive, child_pid[0]):
            break
        await asyncio.sleep(0.01)


async def test_shutdown_stops_the_agent(agent: RunningAgent) -> None:
    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as c:
        await c.wait_ready(timeout=30)
        assert (await c.shutdown()).action == "exit"
        assert await asyncio.wait_for(agent.proc.wait(), 30) == 0


# ---------------------------------------------------------------------- hostile peers (fake agent)


CLOSE = b"<close the connection>"


@contextlib.asynccontextmanager
async def fake_agent(script: list[bytes | dict[str, object]]) -> AsyncIterator[Path]:
    """A unix server that sends hello, then, for the first request it reads, the given bytes."""
    base = Path(tempfile.mkdtemp(prefix="sbx-fake-agent-", dir="/tmp"))
    path = base / "fake.sock"
    hello = {"type": "hello", "id": None, "agent_version": "0", "protocol_version": 1, "capabilities": [],
             "languages": ["python"], "instance": "fake", "pid": 1, "uid": 0, "workdir": "/w",
             "max_frame_bytes": ap.MAX_FRAME_BYTES, "boot": {}}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"stale tail of an old frame" + ap.encode_frame(hello))
        decoder = ap.FrameDecoder()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for payload in decoder.feed(data):
                    req = json.loads(payload)
                    if req["type"] == "ping":
                        writer.write(ap.encode_frame({**hello, "id": req["id"]}))
                        continue
                    for item in script:
                        if item == CLOSE:
                            return
                        if isinstance(item, dict):  # a reply to this request
                            item = ap.encode_frame({**item, "id": req["id"]})
                        writer.write(item)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([b"this is not a frame at all"], id="garbage"),
        pytest.param([b"SBX\x01" + (ap.MAX_FRAME_BYTES + 1).to_bytes(4, "big")], id="oversize"),
        pytest.param([b"SBX\x09\x00\x00\x00\x02{}"], id="bad-version"),
        pytest.param([{"type": "exit", "exit_code": "zero"}], id="bad-schema"),
        pytest.param([b"SBX\x01\x00\x00\x00\x05[1,2]"], id="not-an-object"),
    ],
)
async def test_invalid_frames_are_rejected_with_guest_agent_error(
    script: list[bytes | dict[str, object]],
) -> None:
    async with fake_agent(script) as path, await AgentClient.open_unix(path) as c:
        await c.wait_ready(timeout=10)  # the stale bytes before hello are skipped
        with pytest.raises(GuestAgentError):
            await c.exec("print(1)", language="python", timeout_s=5, reply_grace_s=5)
        assert c.state is AgentClientState.BROKEN
        with pytest.raises(GuestAgentError):
            await c.ping()


async def test_agent_reported_error_and_wrong_reply_type() -> None:
    script: list[bytes | dict[str, object]] = [{"type": "error", "code": "internal", "message": "boom"}]
    async with fake_agent(script) as path, await AgentClient.open_unix(path) as c:
        await c.wait_ready(timeout=10)
        with pytest.raises(GuestAgentError, match="internal: boom") as info:
            await c.list_files(".")
        assert info.value.context["code"] == "internal"
        assert c.state is AgentClientState.READY  # a refused request does not break the connection
    wrong: list[bytes | dict[str, object]] = [{"type": "cancel_result", "found": True}]
    async with fake_agent(wrong) as path, await AgentClient.open_unix(path) as c:
        await c.wait_ready(timeout=10)
        with pytest.raises(GuestAgentError, match="unexpected"):
            await c.list_files(".")


async def test_peer_closing_mid_request_is_outcome_unknown() -> None:
    async with fake_agent([CLOSE]) as path, await AgentClient.open_unix(path) as c:
        await c.wait_ready(timeout=10)
        with pytest.raises(CommunicationOutcomeUnknownError):
            await c.list_files(".")
        assert c.state is AgentClientState.BROKEN


async def test_cancelling_an_exec_kills_it_and_the_agent_stays_usable(client: AgentClient) -> None:
    pids: list[int] = []
    started = asyncio.Event()
    printed: list[str] = []

    def on_stdout(data: str) -> None:
        printed.append(data)
        if "\n" in "".join(printed) and not pids:
            pids.append(int("".join(printed).split()[0]))
            started.set()

    code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(300)"
    task = asyncio.create_task(client.exec(code, language="python", on_stdout=on_stdout))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The agent kills the run when the client cancels; a ping is answered after the cancel.
    await client.ping()
    for _ in range(500):
        if not await asyncio.to_thread(_alive, pids[0]):
            break
        await asyncio.sleep(0.01)
    assert not _alive(pids[0])
    assert (await client.exec("print('next')", language="python")).stdout == "next\n"


@pytest.mark.parametrize("session", [False, True], ids=["one-shot", "session"])
async def test_an_exec_cancelled_before_the_agent_saw_it_does_not_run(
    client: AgentClient, agent: RunningAgent, session: bool
) -> None:
    """A cancel overtaking its exec (not yet registered in the agent) is remembered: the exec is
    refused at once, with nothing run and no session state lost, instead of running to its timeout."""
    if session:
        assert (await client.exec("kept = 7", language="python", session=True)).exit_code == 0
    prefix, n = client._new_id().rsplit("-", 1)
    target = f"{prefix}-{int(n) + 2}"  # the cancel request takes the next id, the exec the one after
    assert await client.cancel(target) is False
    marker = agent.workdir / "ran.txt"
    code = f"open({str(marker)!r}, 'w').close()\nimport time\ntime.sleep(30)"
    async with asyncio.timeout(10):
        r = await client.exec(code, language="python", session=session, timeout_s=60)
    assert (r.cancelled, r.timed_out, r.exit_code, r.session_reset) == (True, False, -1, False)
    assert "cancelled before it started" in r.stderr
    assert not marker.exists()
    if session:
        r = await client.exec("print(kept)", language="python", session=True)
        assert r.stdout == "7\n", r.stderr


async def test_upload_cut_by_a_disconnect_leaves_no_partial_file(agent: RunningAgent) -> None:
    _, writer = await asyncio.open_unix_connection(str(agent.socket))
    chunk = b"a" * 1000
    whole = hashlib.sha256(chunk * 2).hexdigest()
    writer.write(ap.encode_request(ap.WriteFileRequest(id="up1", path="cut.bin", size=2000, sha256=whole)))
    writer.write(ap.encode_request(ap.WriteChunk(
        id="up1", seq=0, data=base64.b64encode(chunk).decode(),
        sha256=hashlib.sha256(chunk).hexdigest())))
    await writer.drain()
    await asyncio.sleep(0.2)  # let the agent take the first chunk before the cut
    writer.close()
    await writer.wait_closed()
    async with await AgentClient.open_unix(agent.socket, connect_timeout=20) as c:
        await c.wait_ready(timeout=30)
        await c.ping()
        entries = await c.list_files(".")
        assert [e.name for e in entries] == [], entries


@pytest.mark.skipif(not IS_ROOT, reason="the process cap applies to the dropped-privilege uid")
async def test_fork_bomb_is_capped_and_killed() -> None:
    async with run_agent("--max-user-processes", "40") as running, \
            await AgentClient.open_unix(running.socket, connect_timeout=20) as c:
        await c.wait_ready(timeout=30)
        bomb = await c.exec("b() { b | b & }; b; sleep 300", language="raw", timeout_s=3)
        assert bomb.timed_out and bomb.exit_code == -1
        # Every bomb process ran a staged code file; none may be left (the agent's own argv is excluded).
        assert await asyncio.to_thread(_pids_mentioning, str(running.base / "run" / "code-")) == []
        after = await c.exec("echo alive", language="raw")
        assert (after.stdout, after.exit_code) == ("alive\n", 0)
