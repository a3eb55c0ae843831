"""Scheduler / execution helpers without VMs: input validation before any VM, lifecycle states,
result model, truncation / OOM helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxInputError, SandboxTransientError
from exec_sandbox.models import ExecutionResult, TimingBreakdown
from exec_sandbox.protocol.agent import MAX_CODE_BYTES
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError, SessionClosedError
from exec_sandbox.sandbox.scheduler import RunResult, Scheduler, SchedulerState
from exec_sandbox.settings import Settings
from exec_sandbox.vm.execution import OOM_CONSOLE_PATTERN, oom_note, truncation_marker


@pytest.fixture
def scheduler(tmp_path: Path) -> Scheduler:
    # Never started: every call below must fail on its input before the state is even looked at.
    return Scheduler(
        SchedulerConfig(max_code_bytes=100, max_file_bytes=10), settings=Settings(cache_dir=tmp_path)
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"code": "x" * 101}, "code"),
        ({"code": "a\x00b"}, "code"),
        ({"code": b"print(1)"}, "code"),
        ({"language": "ruby"}, "language"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": 3601}, "timeout_seconds"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"memory_mb": 32}, "memory_mb"),
        ({"memory_mb": True}, "memory_mb"),
        ({"env_vars": {"1BAD": "x"}}, "env_vars"),
        ({"env_vars": {"PYTHONUNBUFFERED": "0"}}, "env_vars"),
        ({"env_vars": {"SBX_STATUS_FD": "3"}}, "env_vars"),
        ({"env_vars": {"OK": "nul\x00"}}, "env_vars['OK']"),
        ({"files": {"../up": b"x"}}, "files"),
        ({"files": {"/etc/passwd": b"x"}}, "files"),
        ({"files": {"big": b"x" * 11}}, "files['big']"),
        ({"files": {"f": "text, not bytes"}}, "files['f']"),
        ({"download": "single/string"}, "download"),
        ({"download": ["/root/secret"]}, "download"),
    ],
)
async def test_run_refuses_bad_input_naming_the_field(
    scheduler: Scheduler, kwargs: dict[str, object], field: str
) -> None:
    args = {"code": "print(1)", **kwargs}
    code = args.pop("code")
    with pytest.raises(SandboxInputError) as info:
        await scheduler.run(code, **args)  # type: ignore[arg-type]
    assert info.value.context["field"] == field
    assert scheduler.state is SchedulerState.NEW


async def test_missing_upload_file_is_an_input_error(scheduler: Scheduler, tmp_path: Path) -> None:
    with pytest.raises(SandboxInputError, match="cannot read"):
        await scheduler.run("print(1)", files={"f": tmp_path / "absent"})
    with pytest.raises(SandboxInputError, match="not a regular file"):
        await scheduler.run("print(1)", files={"f": tmp_path})


async def test_session_refuses_bad_input(scheduler: Scheduler) -> None:
    with pytest.raises(SandboxInputError, match="idle_timeout_seconds"):
        await scheduler.session(idle_timeout_seconds=-1)
    with pytest.raises(SandboxInputError, match="language"):
        await scheduler.session(language="cobol")
    with pytest.raises(SandboxInputError, match="disk_size_mb"):
        await scheduler.session(disk_size_mb=10)


async def test_valid_calls_on_a_scheduler_that_is_not_started_say_so(scheduler: Scheduler) -> None:
    with pytest.raises(SchedulerClosedError, match="async with Scheduler"):
        await scheduler.run("print(1)")
    with pytest.raises(SchedulerClosedError):
        await scheduler.session()
    with pytest.raises(SchedulerClosedError):
        _ = scheduler.admission


async def test_close_before_start_is_a_noop_and_final(scheduler: Scheduler) -> None:
    await scheduler.close()
    await scheduler.close()
    assert scheduler.state is SchedulerState.CLOSED
    with pytest.raises(SchedulerClosedError, match="closed"):
        await scheduler.start()
    with pytest.raises(SchedulerClosedError):
        await scheduler.run("print(1)")


def test_error_classes_sit_in_the_tree() -> None:
    assert issubclass(SchedulerClosedError, SandboxTransientError)
    assert issubclass(SessionClosedError, SandboxInputError)


def test_run_result_is_an_execution_result_with_files() -> None:
    result = RunResult(
        stdout="",
        stderr="",
        exit_code=0,
        execution_time_ms=1.0,
        timing=TimingBreakdown(total_ms=2.0),
        language="python",
        files={"out.bin": b"\x00\xff"},
        download_errors={"missing": "not_found"},
    )
    assert isinstance(result, ExecutionResult)
    assert result.files["out.bin"] == b"\x00\xff"
    with pytest.raises(ValueError):
        RunResult(
            stdout="",
            stderr="",
            exit_code=0,
            execution_time_ms=0,
            timing=TimingBreakdown(total_ms=0),
            language="python",
            unknown=1,  # type: ignore[call-arg]
        )


def test_truncation_marker_and_oom_note_say_what_happened() -> None:
    marker = truncation_marker("stdout", 10, 52428800)
    assert marker.startswith("\n[sandbox] stdout truncated") and "52428800" in marker and "10" in marker
    assert "128 MiB" in oom_note(128)


@pytest.mark.parametrize(
    ("line", "matches"),
    [
        ("[    6.765190] Out of memory: Killed process 38 (python3) total-vm:103564kB, UID:1000", True),
        ("[    3.1] python3 invoked oom-killer: gfp_mask=0x140cca", False),
        ("[    3.1] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null)", True),
        ("[    3.7] __vm_enough_memory: pid: 41, comm: python3, no enough memory", False),
    ],
)
def test_oom_console_pattern(line: str, matches: bool) -> None:
    assert bool(OOM_CONSOLE_PATTERN.search(line)) is matches


def test_code_limit_of_the_config_is_capped_by_the_protocol() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_code_bytes=MAX_CODE_BYTES + 1)
