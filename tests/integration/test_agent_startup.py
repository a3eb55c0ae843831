"""The guest agent's boot path stays light, and its own process starter behaves like Popen.

Under TCG every module imported at boot costs guest CPU (enum, which json/re/signal/subprocess pull
in, was ~0.3 s of a cold boot). These tests run real interpreters and real child processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exec_sandbox.protocol import agent as agent_protocol
from tests.support.guest_agent import load_agent

pytestmark = pytest.mark.integration

AGENT = agent_protocol.GUEST_AGENT_PATH
HEAVY = ("enum", "re", "json", "subprocess", "signal", "typing", "selectors", "argparse")


agent = load_agent("sbx_guest_agent_startup_test")
# What the guest init imports (every module of the agent), then the modules the probes below use.
IMPORT_AGENT = "import sbx_agent.cli, sbx_agent.agent; from sbx_agent import wire, procs, cgroups, cli"


def _modules_after(code: str) -> set[str]:
    # -I -S like the guest init: no site, so nothing but the agent decides what gets imported.
    probe = (
        f"import sys; sys.path.insert(0, {str(AGENT.parent)!r}); {code}; "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    argv = [sys.executable, "-I", "-S", "-c", probe]
    return set(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split())


def test_importing_the_agent_pulls_in_no_heavy_module() -> None:
    assert _modules_after(IMPORT_AGENT) == set()


def test_frames_and_argument_parsing_stay_light() -> None:
    code = (
        f"{IMPORT_AGENT}; f = wire.encode_frame({{'type': 'hello', 'x': [1.5, None]}}); "
        "assert wire.Decoder().feed(f) == [{'type': 'hello', 'x': [1.5, None]}]; "
        "cli.parse_args(['--workdir', '/tmp', '--spare', 'python', '--no-drop-privileges'])"
    )
    assert _modules_after(code) == set()


def test_one_shot_process_start_stays_light(tmp_path: Path) -> None:
    code = (
        f"{IMPORT_AGENT}; import os; "
        "p = procs.start_process(['true'], stdin=procs.DEVNULL, "
        f"cwd={str(tmp_path)!r}, env={{'PATH': '/usr/bin:/bin'}}); "
        "os.waitpid(p.pid, 0); cgroups.kill_tree(p.pid, set, None)"
    )
    assert _modules_after(code) == set()


def _run(argv: list[str], tmp_path: Path, **kwargs: object) -> tuple[int, bytes, bytes]:
    proc = agent.start_process(argv, cwd=str(kwargs.pop("cwd", tmp_path)), **kwargs)  # type: ignore[arg-type]
    try:
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        proc.stdout.close()
        proc.stderr.close()
    _, status = os.waitpid(proc.pid, 0)
    return status, out, err


def test_start_process_like_popen(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SBX_X": "é"}
    script = 'echo "$SBX_X"; pwd; echo err >&2; read -r line || echo eof; umask; exit 3'
    status, out, err = _run(["sh", "-c", script], tmp_path, stdin=agent.DEVNULL, env=env)
    assert os.WEXITSTATUS(status) == 3
    assert out.decode().split("\n")[:4] == ["é", str(tmp_path), "eof", "0022"]
    assert err == b"err\n"


def test_start_process_new_session_and_passed_fds(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        script = (
            "import os; print('own-session' if os.getsid(0) == os.getpid() else '-'); "
            f"os.write({w}, b'hi\\n')"
        )
        argv = [sys.executable, "-c", script]
        status, out, _ = _run(argv, tmp_path, stdin=agent.DEVNULL, env={}, pass_fds=(w,))
        assert os.WEXITSTATUS(status) == 0
        assert out == b"own-session\n"
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"hi\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_start_process_stdin_fd_and_no_leaked_fds(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    os.write(w, b"from stdin\n")
    os.close(w)
    path = {"PATH": "/usr/bin:/bin"}
    status, out, _ = _run(["sh", "-c", "cat; ls /proc/self/fd"], tmp_path, stdin=r, env=path)
    os.close(r)
    assert os.WEXITSTATUS(status) == 0
    lines = out.decode().split()
    assert lines[:2] == ["from", "stdin"]
    assert sorted(lines[2:], key=int)[:3] == ["0", "1", "2"] and len(lines[2:]) <= 4  # + the fd ls opens
    assert set(os.listdir("/proc/self/fd")) == before


def test_start_process_failures_raise_oserror_and_leak_nothing(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        agent.start_process([str(tmp_path / "missing")], stdin=agent.DEVNULL, cwd=str(tmp_path), env={})
    with pytest.raises(FileNotFoundError):
        agent.start_process(["no-such-program-sbx"], stdin=agent.DEVNULL, cwd=str(tmp_path), env={})
    with pytest.raises(FileNotFoundError):
        agent.start_process(["/bin/true"], stdin=agent.DEVNULL, cwd=str(tmp_path / "nodir"), env={})
    with pytest.raises(ValueError, match="environment"):
        agent.start_process(["/bin/true"], stdin=agent.DEVNULL, cwd=str(tmp_path), env={"A=B": "1"})
    assert set(os.listdir("/proc/self/fd")) == before
    # the failed children were reaped by nobody yet: collect them so no zombie outlives the test
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another uid")
def test_start_process_drops_to_the_sandbox_uid(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    status, out, _ = _run(
        ["sh", "-c", "id -u; id -g; id -G"], tmp_path, stdin=agent.DEVNULL, env={"PATH": "/usr/bin:/bin"},
        uid=1000, gid=1000,
    )
    assert os.WEXITSTATUS(status) == 0
    assert out.decode().split() == ["1000", "1000", "1000"]


def test_image_pycs_are_loaded_without_the_import_machinery(tmp_path: Path) -> None:
    """As in the image (unchecked-hash .pyc files): the package loads its modules itself, in
    dependency order, and still imports nothing heavy; with timestamp .pyc files it does not."""
    import shutil

    pkg = tmp_path / "sbx_agent"
    shutil.copytree(AGENT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
                    str(pkg)], check=True)
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import sbx_agent; "
        "from sbx_agent.cli import main; from sbx_agent import wire; import sbx_agent.agent; "
        "assert wire.Decoder().feed(wire.encode_frame({'a': 1})) == [{'a': 1}]; "
        "mods = [sys.modules['sbx_agent.' + m] for m in sbx_agent.MODULES]; "
        "print(all(getattr(m, '__spec__', 1) is None for m in mods), "
        f"' '.join(m for m in {HEAVY!r} if m in sys.modules) or '-')"
    )
    argv = [sys.executable, "-I", "-S", "-c", probe]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["True", "-"], out.stderr  # no spec: none went through importlib
    shutil.rmtree(pkg / "__pycache__")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)  # timestamp ones
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["False", "-"], out.stderr
