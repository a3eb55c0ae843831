"""The guest's REPL drivers (``sbx_agent/drivers/``) run by the host's own interpreters.

The agent starts them as ``python3 -u -c <source>`` / ``node -e <source>`` with a code pipe and a
status pipe; these tests do the same, without the agent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.guest_agent import AGENT

DRIVERS = AGENT / "drivers"
NODE = shutil.which("node")


class Driver:
    def __init__(self, argv: list[str], tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        code_r, self.code_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.out_path, self.err_path = tmp / "out", tmp / "err"
        env = {"PATH": "/usr/bin:/bin", "SBX_REPL_IN": str(code_r), "SBX_REPL_OUT": str(status_w),
               "LANG": "C.UTF-8", **(extra_env or {})}
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                         cwd=tmp, pass_fds=(code_r, status_w))
        os.close(code_r)
        os.close(status_w)
        self.status = os.fdopen(self.status_r, "rb", buffering=0)
        self.seen_out = self.seen_err = 0

    def run(self, code: str, *, mark: bytes = b"") -> tuple[int, str, str]:
        data = code.encode()
        os.write(self.code_w, mark + str(len(data)).encode() + b"\n" + data)
        line = b""
        while not line.endswith(b"\n"):
            b = self.status.read(1)
            assert b, f"driver died: {self.proc.wait(5)} {self.err_path.read_text()}"
            line += b
        out, err = self.out_path.read_text(), self.err_path.read_text()
        new = out[self.seen_out:], err[self.seen_err:]
        self.seen_out, self.seen_err = len(out), len(err)
        return int(line), *new

    def close(self) -> int:
        if self.code_w >= 0:
            os.close(self.code_w)
            self.code_w = -1
            self.status.close()
        return self.proc.wait(10)


@pytest.fixture
def python_driver() -> Iterator[Driver]:
    with tempfile.TemporaryDirectory() as tmp:
        source = (DRIVERS / "python_repl.py").read_text()
        d = Driver([sys.executable, "-u", "-c", source], Path(tmp))
        yield d
        d.close()


@pytest.fixture
def node_driver() -> Iterator[Driver]:
    if NODE is None:
        pytest.skip("node is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        source = (DRIVERS / "node_repl.js").read_text()
        d = Driver([NODE, "-e", source], Path(tmp))
        yield d
        d.close()


def test_python_state_persists_and_exit_codes(python_driver: Driver) -> None:
    assert python_driver.run("x = 41\nprint('hi')") == (0, "hi\n", "")
    assert python_driver.run("print(x + 1)") == (0, "42\n", "")
    assert python_driver.run("raise SystemExit(3)")[0] == 3
    assert python_driver.run("import sys; sys.exit('bye')") == (1, "", "bye\n")
    assert python_driver.run("raise SystemExit")[0] == 0
    assert python_driver.run("print(x)") == (0, "41\n", "")  # SystemExit ends the block, not the driver


def test_python_traceback_names_the_user_code_only(python_driver: Driver) -> None:
    rc, _, err = python_driver.run("def f():\n    1 / 0\nf()")
    assert rc == 1
    assert "ZeroDivisionError" in err and '<session-1>", line 2, in f' in err
    assert "_sbx_main" not in err and "python_repl" not in err


def test_python_reseed_mark_reseeds_random_before_the_block(python_driver: Driver) -> None:
    python_driver.run("import random; random.seed(7); a = random.random()")
    assert python_driver.run("random.seed(7); print(random.random() == a)")[1] == "True\n"
    python_driver.run("random.seed(7)")
    # 'r': reseeded from the OS before the block, so the seeded sequence is gone
    assert python_driver.run("print(random.random() == a)", mark=b"r")[1] == "False\n"


def test_python_driver_ends_on_eof(python_driver: Driver) -> None:
    python_driver.run("pass")
    assert python_driver.close() == 0


def test_node_state_persists_and_errors(node_driver: Driver) -> None:
    assert node_driver.run("var x = 41; console.log('hi')") == (0, "hi\n", "")
    assert node_driver.run("console.log(x + 1)") == (0, "42\n", "")
    rc, _, err = node_driver.run("null.y")
    assert rc == 1 and "TypeError" in err
    assert node_driver.run("console.log(x)")[0] == 0


def test_node_awaits_a_returned_promise(node_driver: Driver) -> None:
    code = "(async () => { await new Promise(r => setTimeout(r, 50)); console.log('late'); })()"
    assert node_driver.run(code) == (0, "late\n", "")


def test_node_driver_ends_on_eof(node_driver: Driver) -> None:
    node_driver.run("1")
    assert node_driver.close() == 0


def test_python_code_runs_in_a_real_main_module(python_driver: Driver) -> None:
    code = ("import pickle, __main__\ndef f(x):\n    return x + 1\n"
            "print(pickle.loads(pickle.dumps(f))(1), __main__.f is f)")
    assert python_driver.run(code) == (0, "2 True\n", "")
    assert python_driver.run("print(sorted(k for k in dir(__main__) if 'sbx' in k))") == (0, "[]\n", "")


def test_python_forked_child_never_reports_or_reads(python_driver: Driver) -> None:
    code = ("import os, sys\nme = os.getpid()\npid = os.fork()\nif pid == 0:\n    sys.exit(5)\n"
            "print('status', os.waitpid(pid, 0)[1] >> 8)")
    assert python_driver.run(code) == (0, "status 5\n", "")
    assert python_driver.run("print(os.getpid() == me)") == (0, "True\n", "")


def test_node_runs_in_the_global_context(node_driver: Driver) -> None:
    code = ("console.log(typeof performance, typeof require, typeof module.exports, global === globalThis,"
            " typeof inFd, typeof queue, typeof pump, typeof report)")
    out = "object function object true undefined undefined undefined undefined\n"
    assert node_driver.run(code) == (0, out, "")
    assert node_driver.run("let a = 1; const b = 2;")[0] == 0
    assert node_driver.run("console.log(a + b)") == (0, "3\n", "")


def test_node_error_stacks_show_no_driver_frames(node_driver: Driver) -> None:
    rc, _, err = node_driver.run("function boom() { throw new Error('x'); }\nboom()")
    assert rc == 1 and "Error: x" in err and "<session-1>:1" in err
    assert "[eval]" not in err and "node:vm" not in err


@pytest.fixture(scope="module")
def reseed_addon(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if NODE is None or cc is None:
        pytest.skip("needs node and a C compiler")
    out = tmp_path_factory.mktemp("addon") / "reseed.node"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(DRIVERS / "reseed.c")], check=True)
    return out


def _node_driver_with(tmp: Path, addon: str) -> Driver:
    assert NODE is not None
    source = (DRIVERS / "node_repl.js").read_text()
    return Driver([NODE, "-e", source], tmp, {"SBX_REPL_RESEED": addon})


def test_node_reseed_mark_reseeds_in_place(reseed_addon: Path, tmp_path: Path) -> None:
    d = _node_driver_with(tmp_path, str(reseed_addon))
    try:
        assert d.run("var before = Math.random; var pid = process.pid")[0] == 0
        code = ("const xs = Array.from({length: 1000}, () => Math.random());\n"
                "console.log(Math.random !== before, process.pid === pid, xs.every((x) => x >= 0 && x < 1),"
                " new Set(xs).size, typeof process.env.SBX_REPL_RESEED)")
        assert d.run(code, mark=b"r") == (0, "true true true 1000 undefined\n", "")
    finally:
        d.close()


def test_node_reseed_fails_closed_without_the_addon(tmp_path: Path) -> None:
    if NODE is None:
        pytest.skip("node is not installed")
    d = _node_driver_with(tmp_path, str(tmp_path / "missing.node"))
    code = b"console.log('ran')"
    os.write(d.code_w, b"r" + str(len(code)).encode() + b"\n" + code)
    assert d.status.read(1) == b""  # no status: the driver exits before running user code
    assert d.close() == 70
    assert "ran" not in d.out_path.read_text()
