"""``sbx run`` end to end: the real console script in a subprocess, real VMs under TCG.

Every test gives the CLI its own short ``SMARTVM_RUNTIME_DIR`` and ``TMPDIR`` and, after the CLI
exits, checks that nothing it made is left: no file under them (VM sockets, overlays, the
qemu-storage-daemon's dir), no process whose command line names them (QEMU, qemu-storage-daemon),
no guest RAM file of its VM in /dev/shm. Each ``sbx run`` that gets past input validation boots one VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exec_sandbox.vm_manager import VmManager

pytestmark = pytest.mark.integration

SBX = Path(sys.executable).parent / "sbx"


@dataclass
class Sbx:
    """Runs the ``sbx`` console script with a private runtime dir and checks it is left clean."""

    runtime_dir: Path
    cwd: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXEC_SANDBOX_SCHEDULER_")}
        env.update(
            SMARTVM_RUNTIME_DIR=str(self.runtime_dir / "qemu"),
            TMPDIR=str(self.tmp_dir),  # the qemu-storage-daemon's private dir goes here
            EXEC_SANDBOX_FORCE_EMULATION="1",
            PYTHONWARNINGS="error",
        )
        env.update(extra or {})
        return env

    def run(
        self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(SBX), "run", *args],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=self.env(env),
            timeout=timeout,
            check=False,
        )
        self.assert_clean()
        return proc

    @property
    def tmp_dir(self) -> Path:
        return self.runtime_dir / "tmp"

    def leftovers(self, vm_id: str | None = None) -> list[str]:
        found = [str(p) for p in self.runtime_dir.rglob("*") if p.is_file() or p.is_socket()]
        found += [str(p) for p in self.tmp_dir.iterdir()]
        needle = str(self.runtime_dir).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                found.append(f"process {entry}: {cmdline[:200]!r}")
        if vm_id:
            found += [str(p) for p in Path("/dev/shm").glob(f"**/*{vm_id}*")]
        return found

    def assert_clean(self, vm_id: str | None = None) -> None:
        # The CLI has exited: whatever it made must already be gone.
        assert not self.leftovers(vm_id), self.leftovers(vm_id)


@pytest.fixture
def sbx(tmp_path: Path) -> Iterator[Sbx]:
    # Short on purpose: QEMU's unix socket paths must stay under 108 bytes.
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbxc-", dir="/tmp"))
    work = tmp_path / "work"
    work.mkdir()
    try:
        (runtime_dir / "tmp").mkdir()
        yield Sbx(runtime_dir, work)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _summary(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("sbx: exit ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_print_1(sbx: Sbx) -> None:
    proc = sbx.run("print(1)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1\n"
    summary = _summary(proc.stderr)
    assert "exit 0" in summary and "python" in summary and "tcg" in summary


@pytest.mark.timeout(1200)  # the first use of the JavaScript image may have to build it
def test_javascript_file_streams_both_streams(sbx: Sbx) -> None:
    script = sbx.cwd / "hello.js"
    script.write_text('console.log("js", 6 * 7);\nprocess.stderr.write("to stderr\\n");\n')
    proc = sbx.run(str(script), timeout=1100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "js 42\n"
    assert proc.stderr.startswith("to stderr\n") or "\nto stderr\n" in proc.stderr
    assert "javascript" in _summary(proc.stderr)


def test_stdin_env_and_exit_code_quiet(sbx: Sbx) -> None:
    code = b'import os, sys\nprint(os.environ["GREETING"], os.environ["FROM_HOST"])\nsys.exit(7)\n'
    proc = sbx.run(
        "-q", "-e", "GREETING=hi there", "-e", "FROM_HOST", "-", stdin=code, env={"FROM_HOST": "host-value"}
    )
    assert proc.returncode == 7
    assert proc.stdout == "hi there host-value\n"
    assert proc.stderr == ""  # -q: nothing from sbx itself


def test_upload_download_round_trip(sbx: Sbx) -> None:
    data = os.urandom(300_000)
    (sbx.cwd / "data.bin").write_bytes(data)
    (sbx.cwd / "reversed.bin").write_bytes(b"old content")  # replaced thanks to --force
    outdir = sbx.cwd / "out"
    outdir.mkdir()
    code = (
        "import hashlib, pathlib\n"
        "data = pathlib.Path('in/data.bin').read_bytes()\n"
        "pathlib.Path('sum.txt').write_text(hashlib.sha256(data).hexdigest())\n"
        "pathlib.Path('reversed.bin').write_bytes(data[::-1])\n"
        "print(len(data))\n"
    )
    proc = sbx.run(
        "--upload",
        "data.bin:in/data.bin",
        "--download",
        "/home/sandbox/reversed.bin",
        "--download",
        "sum.txt:out/",
        "--force",
        code,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "300000\n"
    assert (outdir / "sum.txt").read_text() == hashlib.sha256(data).hexdigest()
    assert (sbx.cwd / "reversed.bin").read_bytes() == data[::-1]
    assert f"-> {outdir / 'sum.txt'}" in proc.stderr


def test_json_document(sbx: Sbx) -> None:
    code = (
        "import sys\n"
        "open('report.txt', 'w').write('report body')\n"
        "print('out'); print('err', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    proc = sbx.run("--json", "--download", "report.txt", "--download", "missing.txt:m.txt", code)
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    sbx.assert_clean(doc["vm_id"])
    assert doc["stdout"] == "out\n" and doc["stderr"] == "err\n"
    assert doc["exit_code"] == 3 and doc["sbx_exit_code"] == 3
    assert doc["language"] == "python" and doc["accelerator"] == "tcg"
    assert doc["timed_out"] is False and doc["oom_killed"] is False
    assert set(doc["timing"]) >= {"boot_ms", "execute_ms", "total_ms"}
    assert doc["timing"]["total_ms"] >= doc["timing"]["boot_ms"] > 0
    body = b"report body"
    assert doc["downloads"] == [
        {
            "guest_path": "report.txt",
            "local_path": str(sbx.cwd / "report.txt"),
            "size_bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    ]
    assert (sbx.cwd / "report.txt").read_bytes() == body
    assert list(doc["download_errors"]) == ["missing.txt"]
    assert not (sbx.cwd / "m.txt").exists()
    assert "files" not in doc
    # The failed download is reported on stderr, in one line.
    assert "sbx: error: GuestAgentError: --download failed: missing.txt" in proc.stderr


def test_timeout_exits_124(sbx: Sbx) -> None:
    proc = sbx.run("-t", "2", "import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    assert proc.returncode == 124, proc.stderr
    assert proc.stdout == "started\n"
    assert "timed out" in proc.stderr
    assert "timed out after 2s" in _summary(proc.stderr)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("-m", "1", "print(1)"), "--memory: must be between"),
        (("-t", "0", "print(1)"), "--timeout: must be greater than 0"),
        (("-e", "SBX_PRIVATE=1", "print(1)"), "reserved"),
        (("--download", "/etc/passwd", "print(1)"), "outside the sandbox work dir"),
        (("-l", "ruby", "puts 1"), "unknown language 'ruby'"),
        (("nothere.py",), "no such file: nothere.py"),
    ],
)
def test_invalid_input_exits_126_with_one_line(sbx: Sbx, args: tuple[str, ...], needle: str) -> None:
    proc = sbx.run(*args)
    assert proc.returncode == 126, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sbx: error: SandboxInputError: ")
    assert needle in lines[0]


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("signum", "code", "message"),
    [(signal.SIGTERM, 143, "sbx: terminated"), (signal.SIGINT, 130, "sbx: interrupted")],
)
def test_output_streams_live_and_a_signal_cleans_up(
    sbx: Sbx, signum: signal.Signals, code: int, message: str
) -> None:
    program = "import time\nprint('tick', flush=True)\ntime.sleep(600)\n"
    proc = subprocess.Popen(
        [str(SBX), "run", "-t", "900", program],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=sbx.cwd,
        env=sbx.env(),
        # As in a terminal. A shell without job control starts background commands with
        # SIGINT ignored, and sbx (like Python, like any program) keeps an inherited ignore.
        preexec_fn=_sigint_default,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        # The line arrived while the program (sleeping for 10 minutes) was still running.
        assert line == "tick\n"
        assert proc.poll() is None
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    assert message in stderr and "Traceback" not in stderr
    sbx.assert_clean()


def test_sandbox_failure_exits_125_with_one_line(sbx: Sbx) -> None:
    broken = {"EXEC_SANDBOX_QEMU_SYSTEM_BINARY": str(sbx.cwd / "no-such-qemu")}
    proc = sbx.run("-q", "print(1)", env=broken)
    assert proc.returncode == 125
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # -q: no warnings, only the error line
    assert lines[0].startswith("sbx: error: SandboxTransientError: ")
    assert "no-such-qemu" in lines[0] and "safe to retry" in lines[0]

    proc = sbx.run("--json", "print(1)", env=broken)
    assert proc.returncode == 125
    doc = json.loads(proc.stdout)
    assert doc["sbx_exit_code"] == 125
    assert doc["error"]["type"] == "SandboxTransientError" and doc["error"]["retryable"] is True
    assert "Traceback" not in proc.stderr


def test_memory_bomb_exits_137(sbx: Sbx) -> None:
    bomb = "a = []\nwhile True:\n    a.append(b'x' * (8 << 20))\n"
    proc = sbx.run("--json", "-m", "128", bomb)
    assert proc.returncode == 137, proc.stderr
    doc = json.loads(proc.stdout)
    sbx.assert_clean(doc["vm_id"])
    assert doc["oom_killed"] is True and doc["sbx_exit_code"] == 137
    assert "out-of-memory" in doc["stderr"]


@pytest.mark.timeout(900)
def test_first_run_builds_the_image_with_progress(sbx: Sbx, sbx_images: VmManager, tmp_path: Path) -> None:
    # A fresh cache dir that already has the kernel (compiling one takes long) and the downloaded
    # packages, so the first run must build only the python rootfs itself.
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    kernel_dir = sbx_images.get_kernel().parent
    shutil.copytree(kernel_dir, cache / "images" / kernel_dir.name)
    debs = sbx_images.settings.cache_dir / "debs"
    if debs.is_dir():
        shutil.copytree(debs, cache / "debs", copy_function=os.link)
    env = {"EXEC_SANDBOX_CACHE_DIR": str(cache)}

    first = sbx.run("print(1)", env=env, timeout=800)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "1\n"
    assert "sbx: preparing the python guest image" in first.stderr
    assert re.search(r"✓ rootfs: .*\(\d+\.\d+s\)", first.stderr), first.stderr
    assert [p.name for p in (cache / "images").glob("python-*")], "no python bundle was built"

    second = sbx.run("-q", "print(2)", env=env)  # cached now; -q: nothing but the program's output
    assert second.returncode == 0, second.stderr
    assert (second.stdout, second.stderr) == ("2\n", "")
