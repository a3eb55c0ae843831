"""``examples/quickstart.py`` (what the README tells a new user to run) works end to end under TCG."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


@pytest.mark.timeout(600)
def test_quickstart_runs_and_prints_what_it_does(tmp_path: Path) -> None:
    env = {**os.environ, "EXEC_SANDBOX_FORCE_EMULATION": "1", "PYTHONWARNINGS": "error"}
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=550,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # Streamed lines arrive one by one, in order.
    assert re.findall(r"\[live \+ *[\d.]+s\] (.*)", out)[:3] == ["tick 0", "tick 1", "tick 2"]
    assert "accelerator=tcg" in out
    assert re.search(r"stdout: node v\d+\.\d+\.\d+: \[ 1, 4, 9 \]  \(exit_code=0\)", out)
    assert "stdout: hello quickstart from " in out and "(exit_code=3)" in out
    assert "timed_out=True exit_code=-1" in out
    assert "stdout: area = 12.566  (exec_count=2)" in out
    assert "round trip of 262144 bytes: sha256 matches" in out
    assert list(tmp_path.iterdir()) == []  # it writes nothing on the host
