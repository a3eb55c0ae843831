"""Result and value models: validation, immutability, JSON round trip, language by extension."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.models import (
    LANGUAGES,
    TIMEOUT_EXIT_CODE,
    ExecutionResult,
    FileInfo,
    PortForward,
    TimingBreakdown,
    language_from_path,
)


def result(**kwargs: object) -> ExecutionResult:
    data: dict[str, object] = {
        "stdout": "hi\n",
        "stderr": "",
        "exit_code": 0,
        "execution_time_ms": 3.5,
        "timing": TimingBreakdown(boot_ms=1200.0, execute_ms=3.5, total_ms=1250.0),
        "language": "python",
    }
    data.update(kwargs)
    return ExecutionResult.model_validate(data)


def test_languages_match_the_agent_protocol() -> None:
    assert LANGUAGES == ("python", "javascript", "raw")


@pytest.mark.parametrize(
    ("path", "lang"),
    [
        ("a.py", "python"),
        ("dir/x.PY", "python"),
        ("s.js", "javascript"),
        ("m.mjs", "javascript"),
        ("c.cjs", "javascript"),
        ("run.sh", "raw"),
    ],
)
def test_language_from_path(path: str, lang: str) -> None:
    assert language_from_path(path) == lang


@pytest.mark.parametrize("path", ["README", "x.rb", "script.py.txt", ".py"])
def test_language_from_path_unknown(path: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        language_from_path(path)
    assert info.value.context["field"] == "language"
    assert info.value.context["value"] == path
    assert ".py" in info.value.message


def test_timing_defaults_and_bounds() -> None:
    timing = TimingBreakdown(total_ms=10.0)
    assert timing.restore_ms is None
    assert (timing.setup_ms, timing.overlay_ms, timing.boot_ms, timing.admission_wait_ms) == (0, 0, 0, 0)
    with pytest.raises(ValidationError):
        TimingBreakdown(total_ms=-1.0)
    with pytest.raises(ValidationError):
        TimingBreakdown(total_ms=1.0, boot_ms=-0.1)
    with pytest.raises(ValidationError):
        TimingBreakdown()  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TimingBreakdown(total_ms=1.0, bogus_ms=2.0)  # type: ignore[call-arg]


def test_result_defaults_and_success() -> None:
    r = result()
    assert r.success
    assert (r.timed_out, r.oom_killed, r.warm_pool_hit, r.restored_from_snapshot) == (False,) * 4
    assert (r.stdout_truncated, r.stderr_truncated) == (False, False)
    assert r.accelerator is None and r.memory_peak_mb is None and r.vm_id is None
    assert not result(exit_code=1).success
    assert not result(exit_code=0, oom_killed=True).success


def test_timed_out_result_has_exit_code_minus_one() -> None:
    r = result(timed_out=True, exit_code=TIMEOUT_EXIT_CODE)
    assert r.exit_code == -1 and not r.success
    with pytest.raises(ValidationError, match="exit_code -1"):
        result(timed_out=True, exit_code=0)


def test_result_rejects_bad_fields() -> None:
    for bad in (
        {"language": "ruby"},
        {"accelerator": "hvf"},
        {"execution_time_ms": -1},
        {"signal": 0},
        {"unknown": 1},
        {"memory_peak_mb": -3},
    ):
        with pytest.raises(ValidationError):
            result(**bad)


def test_result_is_frozen_and_round_trips_json() -> None:
    r = result(
        accelerator="tcg",
        vm_id="vm-1",
        warm_pool_hit=True,
        restored_from_snapshot=True,
        memory_peak_mb=41.5,
        signal=9,
        exit_code=137,
        timing=TimingBreakdown(restore_ms=80.0, execute_ms=1.0, total_ms=90.0),
    )
    with pytest.raises(ValidationError):
        r.exit_code = 1  # type: ignore[misc]
    again = ExecutionResult.model_validate_json(r.model_dump_json())
    assert again == r
    assert again.timing.restore_ms == 80.0


def test_file_info() -> None:
    info = FileInfo(name="out.csv", is_dir=False, size=12)
    assert not info.is_symlink
    with pytest.raises(ValidationError):
        FileInfo(name="", is_dir=False, size=0)
    with pytest.raises(ValidationError):
        FileInfo(name="x", is_dir=False, size=-1)


def test_port_forward_model() -> None:
    fwd = PortForward(guest_port=80)
    assert (fwd.host_port, fwd.host_addr, fwd.protocol) == (0, "127.0.0.1", "tcp")
    assert PortForward(guest_port=1, host_addr="0:0::1").host_addr == "::1"
    for bad in (
        {"guest_port": 0},
        {"guest_port": 65536},
        {"guest_port": 1, "host_port": -1},
        {"guest_port": 1, "host_addr": "localhost"},
        {"guest_port": 1, "protocol": "sctp"},
    ):
        with pytest.raises(ValidationError):
            PortForward.model_validate(bad)
