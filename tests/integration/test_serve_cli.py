"""``sbx serve`` as a user starts it: a real subprocess on 127.0.0.1, keys from flags / env / file."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sbx(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``sbx serve ...`` as a subprocess (its state dir a fresh temp dir unless ``--state-dir`` given)."""
    full_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    if args[:1] == ("serve",) and "--state-dir" not in args:
        state = tempfile.mkdtemp(prefix="sbx-state-")
        atexit.register(shutil.rmtree, state, True)
        args = (*args, "--state-dir", state)
    return subprocess.Popen(
        [sys.executable, "-c", "from exec_sandbox.cli import main; main()", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail("sbx serve did not come up")


def serve_up(key: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``sbx serve`` with the one API key ``key`` (and ``args``) on a free port, up; (process, url)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _sbx("serve", "--port", str(port), "--api-key", key, *args, env={"SBX_API_KEYS": ""})
    _wait_up(url, proc)
    return proc, url


def test_serve_refuses_to_start_without_keys() -> None:
    proc = _sbx("serve", "--port", str(_free_port()), env={"SBX_API_KEYS": ""})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and b"no API key" in out


def test_serve_with_keys_from_flag_env_and_file(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    conf = tmp_path / "serve.toml"
    conf.write_text('api_keys = ["from-file"]\n')
    proc = _sbx(
        "serve", "--port", str(port), "--api-key", "from-flag", "--config", str(conf),
        env={"SBX_API_KEYS": "from-env"},
    )
    try:
        _wait_up(url, proc)
        for key in ("from-flag", "from-env", "from-file"):
            r = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": key})
            assert r.status_code == 200 and r.json() == [], key
        r = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": "nope"})
        assert r.status_code == 401 and r.json()["code"] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert b"from-flag" not in out and b"from-env" not in out  # keys never logged


def test_sigkilled_server_leaves_no_vm_behind() -> None:
    from e2b import Sandbox

    from tests.integration.conftest import child_processes
    from tests.integration.serve_server import sdk_env

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _sbx("serve", "--port", str(port), "--api-key", "k", env={"SBX_API_KEYS": ""})
    try:
        _wait_up(url, proc)
        with sdk_env(url, "k"):
            sbx = Sandbox.create()
            assert sbx.commands.run("echo up").stdout == "up\n"
        vms = [pid for pid, comm in child_processes(proc.pid) if comm.startswith("qemu")]
        assert vms, "the sandbox's QEMU should be a child of the server"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = [pid for pid in vms if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"QEMU processes outlived the SIGKILLed server: {alive}")


def _zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return raw[raw.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")
