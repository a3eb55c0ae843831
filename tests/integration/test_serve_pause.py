"""``sbx serve``: pause to disk, fork and snapshot templates, driven by the unmodified E2B SDK (and
httpx for what the SDK does not send) over real HTTP on 127.0.0.1, against real microVMs (TCG).

The restart test runs the server as a user does (a subprocess), SIGKILLs it and starts another on the
same state dir: paused sandboxes come back with their memory and files, running ones are gone, and no
VM outlives the killed server.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import (
    NotFoundException,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
)
from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.integration.conftest import child_processes
from tests.integration.serve_server import KEY_A, KEY_B, RunningServer, running_server, sdk_env
from tests.integration.test_serve_cli import _free_port, _sbx, _zombie, serve_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(max_sandboxes_per_key=3) as srv:
        yield srv


@pytest.fixture
def key_a(server: RunningServer) -> Iterator[str]:
    with sdk_env(server.url, KEY_A):
        yield server.url


def _state_files(root: Path) -> list[Path]:
    return [root, *root.rglob("*")]


def _assert_private(root: Path) -> None:
    for p in _state_files(root):
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert not p.is_symlink() and mode & 0o077 == 0, f"{p} is {oct(mode)}"


def test_paused_sandbox_survives_a_sigkilled_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = "restart-key-0123456789"
    proc, url = serve_up(key, "--state-dir", str(state))
    try:
        with sdk_env(url, key):
            paused = CodeSandbox.create(metadata={"role": "paused"})
            paused.run_code("kept = 6 * 7")
            paused.files.write("notes.txt", "written before the pause")
            paused.commands.run("echo shell-state > /tmp/marker")
            template = paused.create_snapshot(name="restart-template")
            running = Sandbox.create(metadata={"role": "running"})
            paused.pause()
            token_before = paused._envd_access_token
        vms = [pid for pid, comm in child_processes(proc.pid) if comm.startswith("qemu")]
        guests = [pid for pid, comm in child_processes(proc.pid) if comm.startswith("qemu-system")]
        assert len(guests) == 1, "only the running sandbox holds a VM; the paused one is on disk"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in vms):
        assert time.monotonic() < deadline, "QEMU outlived the SIGKILLed server"
        time.sleep(0.2)

    _assert_private(state)
    on_disk = b"".join(p.read_bytes() for p in state.rglob("record.json"))
    assert key.encode() not in on_disk and (token_before or "").encode() not in on_disk
    assert not list(state.glob("*/.tmp-*"))

    proc, url = serve_up(key, "--state-dir", str(state))
    try:
        with sdk_env(url, key):
            listed = {s.sandbox_id: s for s in Sandbox.list().next_items()}
            assert set(listed) == {paused.sandbox_id}, "the running sandbox died with the server"
            assert listed[paused.sandbox_id].state == SandboxState.PAUSED
            assert listed[paused.sandbox_id].metadata == {"role": "paused"}
            with pytest.raises(NotFoundException):
                Sandbox.get_info(running.sandbox_id)

            resumed = CodeSandbox.connect(paused.sandbox_id)
            assert Sandbox.get_info(paused.sandbox_id).state == SandboxState.RUNNING
            assert resumed.run_code("kept").text == "42"
            assert resumed.files.read("notes.txt") == "written before the pause"
            assert resumed.commands.run("cat /tmp/marker").stdout == "shell-state\n"
            assert not list((state / "sandboxes").iterdir()), "a resumed sandbox leaves the disk"

            from_template = CodeSandbox.create(template.snapshot_id)  # templates survive too
            assert from_template.run_code("kept + 1").text == "43"
            from_template.kill()
            resumed.kill()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert key.encode() not in out


def test_a_state_dir_serves_one_server_at_a_time(tmp_path: Path) -> None:
    first, url = serve_up("k1", "--state-dir", str(tmp_path))
    try:
        second = _sbx("serve", "--port", str(_free_port()), "--api-key", "k2", "--state-dir", str(tmp_path),
                      env={"SBX_API_KEYS": ""})
        out, _ = second.communicate(timeout=60)
        assert second.returncode != 0 and b"another sbx serve uses the state dir" in out
        assert httpx.get(url + "/healthz").status_code == 200  # the first one is unharmed
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


def test_paused_sandboxes_hold_no_quota_and_resume_needs_room(server: RunningServer, key_a: str) -> None:
    first = Sandbox.create()
    first.commands.run("echo one > /tmp/who")
    first.pause()
    assert 'sbx_serve_sandboxes{state="paused"} 1.0' in httpx.get(f"{key_a}/metrics").text
    others = [Sandbox.create() for _ in range(3)]  # the quota is 3 running: the paused one is not counted
    try:
        with pytest.raises(RateLimitException):
            Sandbox.connect(first.sandbox_id)  # no room to resume it: 429, and it stays paused
        assert Sandbox.get_info(first.sandbox_id).state == SandboxState.PAUSED
        others.pop().kill()
        resumed = Sandbox.connect(first.sandbox_id)
        assert resumed.commands.run("cat /tmp/who").stdout == "one\n"
        r = httpx.post(f"{key_a}/sandboxes/{first.sandbox_id}/pause", headers={"X-API-KEY": KEY_A})
        assert r.status_code == 204
        r = httpx.post(f"{key_a}/sandboxes/{first.sandbox_id}/pause", headers={"X-API-KEY": KEY_A})
        assert r.status_code == 409 and r.json()["code"] == 409
        r = httpx.post(f"{key_a}/sandboxes/{first.sandbox_id}/fork", headers={"X-API-KEY": KEY_A}, json={})
        assert r.status_code == 409  # a paused sandbox is not forked
        r = httpx.post(f"{key_a}/sandboxes/{first.sandbox_id}/pause", headers={"X-API-KEY": KEY_B})
        assert r.status_code == 404  # another key's sandbox does not exist for it
    finally:
        for s in [first, *others]:
            s.kill()
    assert not list(server.app.registry.store.root.joinpath("sandboxes").iterdir())  # type: ignore[union-attr]


def test_fork_makes_independent_children_of_the_same_key(server: RunningServer, key_a: str) -> None:
    parent = CodeSandbox.create(metadata={"m": "1"})
    children: list[CodeSandbox] = []
    try:
        parent.run_code("x = 'before the fork'")
        parent.files.write("f.txt", "parent file")
        results = parent.fork(count=3)  # quota 3: two children fit, the third is a 429 of its own
        children = [r for r in results if isinstance(r, CodeSandbox)]
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(children) == 2 and len(errors) == 1 and isinstance(errors[0], RateLimitException)
        assert len({parent.sandbox_id, *(c.sandbox_id for c in children)}) == 3
        parent.run_code("x = 'parent moved on'")
        for i, child in enumerate(children):
            again = CodeSandbox.connect(child.sandbox_id)
            assert again.run_code("x").text == "'before the fork'"
            assert again.files.read("f.txt") == "parent file"
            again.files.write("f.txt", f"child {i}")
            assert Sandbox.get_info(child.sandbox_id).metadata == {"m": "1"}
        assert parent.files.read("f.txt") == "parent file"
        assert children[0].files.read("f.txt") == "child 0"
        with sdk_env(key_a, KEY_B):
            with pytest.raises(NotFoundException):
                Sandbox.connect(children[0].sandbox_id)
            assert Sandbox.list().next_items() == []
        r = httpx.post(
            f"{key_a}/sandboxes/{parent.sandbox_id}/fork", headers={"X-API-KEY": KEY_A}, json={"count": 0}
        )
        assert r.status_code == 400 and r.json()["code"] == 400
    finally:
        for s in [parent, *children]:
            s.kill()


_SLEEPERS = "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c '^sleep$' || true"


def test_running_commands_do_not_outlive_a_pause_or_leak_into_a_fork(
    server: RunningServer, key_a: str
) -> None:
    """A command running at a pause ends for its client and is gone in the resumed guest, which
    answers only this server's requests; a fork made while one runs is refused (409) or its child
    does not run it."""
    sbx = Sandbox.create()
    children: list[Sandbox] = []
    try:
        sbx.commands.run("echo kept > /tmp/f")
        long = sbx.commands.run("sleep 45; echo never", background=True)
        r = httpx.post(f"{key_a}/sandboxes/{sbx.sandbox_id}/fork", headers={"X-API-KEY": KEY_A}, json={})
        assert r.status_code in (201, 409), r.text
        if r.status_code == 201:
            children = [Sandbox.connect(f["sandbox"]["sandboxID"]) for f in r.json()]
            assert [c.commands.run(_SLEEPERS).stdout for c in children] == ["0\n"]
        sbx.pause()
        with pytest.raises(SandboxException):
            long.wait()  # ended by the pause, not run to its end
        resumed = Sandbox.connect(sbx.sandbox_id)
        for i in range(20):  # the restored guest answers only what this server asks
            assert resumed.commands.run(f"echo {i}").stdout == f"{i}\n"
        assert resumed.commands.run("cat /tmp/f").stdout == "kept\n"
        assert resumed.commands.run(_SLEEPERS).stdout == "0\n"  # gone in the guest too
        children += resumed.fork(count=1)  # nothing running now: the fork goes ahead
        assert [c.commands.run("cat /tmp/f").stdout for c in children[-1:]] == ["kept\n"]
    finally:
        for c in [sbx, *children]:
            c.kill()


def test_snapshot_template_is_private_to_its_key_and_deletable(server: RunningServer, key_a: str) -> None:
    source = CodeSandbox.create()
    try:
        source.run_code("import math\nvalue = math.pi")
        info = source.create_snapshot(name="pi")
        assert info.snapshot_id in info.names and "pi" in info.names
        source.run_code("value = 0")
        made = CodeSandbox.create(info.snapshot_id)
        try:
            assert made.run_code("round(value, 2)").text == "3.14"
        finally:
            made.kill()
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()]
        assert listed == [info.snapshot_id]
        with sdk_env(key_a, KEY_B):
            with pytest.raises(Exception) as refused:
                Sandbox.create(info.snapshot_id)
            assert "not found" in str(refused.value).lower()
            assert Sandbox.list_snapshots().next_items() == []
            assert Sandbox.delete_snapshot(info.snapshot_id) is False
        r = httpx.post(
            f"{key_a}/sandboxes/{source.sandbox_id}/snapshots",
            headers={"X-API-KEY": KEY_A},
            json={"memory": False},
        )
        assert r.status_code == 400 and "filesystem-only" in r.json()["message"]
        assert Sandbox.delete_snapshot(info.snapshot_id) is True
        with pytest.raises(Exception) as gone:
            Sandbox.create(info.snapshot_id)
        assert "not found" in str(gone.value).lower()
    finally:
        source.kill()
    doc = httpx.get(f"{key_a}/openapi.json").json()
    assert {"/sandboxes/{sandboxID}/fork", "/sandboxes/{sandboxID}/snapshots"} <= set(doc["paths"])


def test_paused_sandboxes_and_templates_on_disk_are_capped_per_key(tmp_path: Path) -> None:
    with running_server(max_saved_per_key=1, state_dir=tmp_path) as srv, sdk_env(srv.url, KEY_A):
        a, b = Sandbox.create(), Sandbox.create()
        try:
            a.pause()
            with pytest.raises(RateLimitException):
                b.create_snapshot()
            with pytest.raises(RateLimitException):
                b.pause()
            assert b.commands.run("echo still running").stdout == "still running\n"
            with sdk_env(srv.url, KEY_B):  # the cap is per key
                Sandbox.create_snapshot(Sandbox.create().sandbox_id)
            a.kill()
            b.pause()  # room again
            assert Sandbox.get_info(b.sandbox_id).state == SandboxState.PAUSED
        finally:
            a.kill()
            b.kill()


def test_auto_pause_at_the_deadline_keeps_the_sandbox(server: RunningServer, key_a: str) -> None:
    sbx = CodeSandbox.create(timeout=4, lifecycle={"on_timeout": "pause"})
    try:
        sbx.run_code("survivor = 'auto-paused'")
        deadline = time.monotonic() + 60
        while Sandbox.get_info(sbx.sandbox_id).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the sandbox was not paused at its deadline"
            time.sleep(0.3)
        resumed = CodeSandbox.connect(sbx.sandbox_id, timeout=120)
        assert resumed.run_code("survivor").text == "'auto-paused'"
        r = httpx.post(
            f"{key_a}/sandboxes", headers={"X-API-KEY": KEY_A},
            json={"templateID": "base", "autoPause": True, "autoPauseMemory": False},
        )
        assert r.status_code == 400 and "autoPauseMemory" in r.json()["message"]
    finally:
        sbx.kill()


def test_paused_sandbox_is_deleted_after_its_retention(tmp_path: Path) -> None:
    with running_server(paused_retention_seconds=8, state_dir=tmp_path) as srv, sdk_env(srv.url, KEY_A):
        sbx = Sandbox.create()
        sbx.pause()
        assert list((tmp_path / "sandboxes").iterdir())  # on disk until its retention passes
        deadline = time.monotonic() + 60
        while Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items():
            assert time.monotonic() < deadline, "the paused sandbox outlived its retention"
            time.sleep(0.2)
        with pytest.raises(NotFoundException):
            Sandbox.connect(sbx.sandbox_id)
        assert not list((tmp_path / "sandboxes").iterdir())
    assert os.listdir(tmp_path / "templates") == []
