"""Scheduler.run end to end: real guests under TCG, the real agent, real overlays and daemon.

One module-scoped Scheduler serves the tests where isolation between Schedulers is not the point;
tests about admission, closing and cancellation make their own. After every test no guest and no
overlay remains; closing a Scheduler leaves no process and no runtime dir behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import CommunicationOutcomeUnknownError, SandboxInputError
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError
from exec_sandbox.sandbox.scheduler import RunResult, Scheduler, SchedulerState
from exec_sandbox.settings import Settings
from tests.integration.test_scheduler_support import (
    assert_closed_clean,
    assert_no_vms,
    qemu_children,
    scheduler_for_tests,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests(SchedulerConfig(max_file_bytes=30_000)) as sched:
        yield sched


async def test_python_run_streams_uploads_downloads_and_times(scheduler: Scheduler, tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []

    def sync_out(data: str) -> None:
        events.append(("out", data))
        raise RuntimeError("a broken stdout callback must not break the run")

    async def async_err(data: str) -> None:
        events.append(("err", data))
        raise ValueError("nor a broken async one")

    boot_lines: list[str] = []
    local = tmp_path / "input.bin"
    local.write_bytes(bytes(range(256)) * 100)
    code = (
        "import hashlib, os, sys, time\n"
        "print('first', flush=True)\n"
        "time.sleep(0.3)\n"
        "print('oops', file=sys.stderr, flush=True)\n"
        "time.sleep(0.3)\n"
        "digest = hashlib.sha256(open('input.bin', 'rb').read()).hexdigest()\n"
        "print('second', open('data/in.txt').read(), digest)\n"
        "os.makedirs('out')\n"
        "open('out/result.txt', 'w').write('made in the guest')\n"
        "open('out/big.bin', 'wb').write(bytes(40_000))\n"
    )
    result = await scheduler.run(
        code,
        language="python",
        on_stdout=sync_out,
        on_stderr=async_err,
        on_boot_log=boot_lines.append,
        files={"data/in.txt": b"uploaded", "input.bin": local},
        download=["out/result.txt", "no/such/file", "out", "out/big.bin"],
        env_vars={"GREETING": "hello"},
    )
    assert isinstance(result, RunResult)
    assert result.exit_code == 0, result.stderr
    assert result.success
    assert result.stdout == f"first\nsecond uploaded {hashlib.sha256(local.read_bytes()).hexdigest()}\n"
    assert result.stderr == "oops\n"
    # Streamed in the order produced, across both streams.
    kinds = [k for k, _ in events]
    assert kinds.index("err") > kinds.index("out")
    assert "".join(d for k, d in events if k == "out") == result.stdout
    assert boot_lines, "on_boot_log saw no console line"
    assert result.files == {"out/result.txt": b"made in the guest"}
    assert result.download_errors.keys() == {"no/such/file", "out", "out/big.bin"}
    assert "does not exist" in result.download_errors["no/such/file"]
    assert "is a directory" in result.download_errors["out"]
    assert "max_file_bytes" in result.download_errors["out/big.bin"]
    assert result.language == "python" and result.accelerator == "tcg"
    t = result.timing
    # teardown_ms is 0: the VM is stopped after the result is handed back (issue 5)
    assert t.boot_ms > 0 and t.execute_ms > 0 and t.teardown_ms == 0
    assert t.total_ms >= t.boot_ms + t.execute_ms
    assert result.execution_time_ms > 0
    await assert_no_vms(scheduler)


async def test_every_run_gets_a_fresh_vm(scheduler: Scheduler) -> None:
    first = await scheduler.run(
        "echo secret > /home/sandbox/left-behind; echo x > /tmp/also; echo $$", language="raw"
    )
    assert first.exit_code == 0, first.stderr
    second = await scheduler.run(
        "ls /home/sandbox/left-behind /tmp/also 2>&1; echo status=$?", language="raw"
    )
    assert first.vm_id != second.vm_id
    assert second.stdout.count("No such file") == 2 and "status=0" not in second.stdout
    await assert_no_vms(scheduler)


async def test_javascript_and_raw_exit_codes_and_env(scheduler: Scheduler) -> None:
    js = await scheduler.run(
        "console.log([1, 2, 3].map(x => x * 2).join(',')); console.error(process.env.WHO); process.exit(3)",
        language="javascript",
        env_vars={"WHO": "js"},
    )
    assert (js.stdout, js.stderr, js.exit_code, js.language) == ("2,4,6\n", "js\n", 3, "javascript")
    assert not js.success
    sh = await scheduler.run('echo "$WHO $(id -u)"; exit 7', language="raw", env_vars={"WHO": "sh"})
    assert (sh.stdout, sh.exit_code) == ("sh 1000\n", 7)
    await assert_no_vms(scheduler)


async def test_timeout_gives_minus_one_and_a_note(scheduler: Scheduler) -> None:
    result = await scheduler.run(
        "import time\nprint('start', flush=True)\nwhile True: time.sleep(0.1)", timeout_seconds=2
    )
    assert result.timed_out and result.exit_code == -1
    assert result.stdout == "start\n"
    assert "[sandbox] execution timed out after 2s" in result.stderr
    assert not result.success
    await assert_no_vms(scheduler)


async def test_bad_input_is_refused_before_any_vm(scheduler: Scheduler) -> None:
    with pytest.raises(SandboxInputError, match="env_vars"):
        await scheduler.run("print(1)", env_vars={"SBX_FD": "1"})
    with pytest.raises(SandboxInputError, match="outside the sandbox work dir"):
        await scheduler.run("print(1)", files={"/etc/passwd": b"x"})
    with pytest.raises(SandboxInputError, match="timeout_seconds"):
        await scheduler.run("print(1)", timeout_seconds=0)
    assert scheduler.admission.stats().granted_total >= 0
    assert not qemu_children(include_daemon=False)


async def test_concurrent_runs_are_bounded_by_admission() -> None:
    config = SchedulerConfig(max_concurrent_vms=2)
    async with scheduler_for_tests(config) as sched:
        peak = 0
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, sched.admission.stats().active)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(sched.run(f"print({i} * 10)") for i in range(3)))
        finally:
            stop.set()
            await watcher
        assert [r.stdout for r in results] == ["0\n", "10\n", "20\n"]
        assert len({r.vm_id for r in results}) == 3
        assert peak == 2
        assert any(r.timing.admission_wait_ms > 0 for r in results)
        await assert_no_vms(sched)  # VMs of finished runs stop in the background
        stats = sched.admission.stats()
        assert (stats.active, stats.granted_total, stats.memory_in_use_mb) == (0, 3, 0)


async def test_close_mid_run_fails_runs_clearly_and_cleans_up() -> None:
    others = frozenset(pid for pid, _ in qemu_children())
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbs-", dir="/tmp"))
    sched = Scheduler(
        SchedulerConfig(max_concurrent_vms=1),
        settings=Settings(force_emulation=True),
        runtime_dir=runtime_dir,
    )
    await sched.start()
    started = asyncio.Event()
    running = asyncio.create_task(
        sched.run(
            "echo started; sleep 100", language="raw", timeout_seconds=300, on_stdout=lambda _: started.set()
        )
    )
    await asyncio.wait_for(started.wait(), 120)
    queued = asyncio.create_task(sched.run("print('never')"))  # waits for admission
    await asyncio.sleep(0.2)
    await sched.close()
    assert sched.state is SchedulerState.CLOSED
    with pytest.raises(CommunicationOutcomeUnknownError) as ran:
        await running
    assert ran.value.context["reason"] == "scheduler_closed"
    with pytest.raises(SchedulerClosedError):
        await queued
    with pytest.raises(SchedulerClosedError):
        await sched.run("print(1)")
    await sched.close()  # idempotent
    await assert_closed_clean(runtime_dir, ignore=others)
    await asyncio.to_thread(runtime_dir.rmdir)


async def test_cancelling_a_run_leaks_nothing(scheduler: Scheduler) -> None:
    # Cancelled while booting ...
    saw_boot = asyncio.Event()
    task = asyncio.create_task(scheduler.run("print(1)", on_boot_log=lambda _: saw_boot.set()))
    await asyncio.wait_for(saw_boot.wait(), 120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_vms(scheduler)
    # ... and while the code runs.
    started = asyncio.Event()
    task = asyncio.create_task(
        scheduler.run(
            "echo go; sleep 100", language="raw", timeout_seconds=300, on_stdout=lambda _: started.set()
        )
    )
    await asyncio.wait_for(started.wait(), 120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_vms(scheduler)
    assert scheduler.admission.stats().active == 0
    # The scheduler is still fine afterwards.
    assert (await scheduler.run("print(5)")).stdout == "5\n"


async def test_transient_boot_failure_is_retried_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real wrapper around QEMU whose first guest launch dies at once (before any code could run).
    counter = tmp_path / "launches"
    wrapper = tmp_path / "qemu-flaky"
    real = Settings().qemu_system_binary
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" -kernel "*) echo x >> ' + str(counter) + ";\n"
        '  if [ "$(wc -l < ' + str(counter) + ')" -eq 1 ]; then echo "flaky start" >&2; exit 1; fi;;\n'
        "esac\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    others = frozenset(pid for pid, _ in qemu_children())
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbs-", dir="/tmp"))
    settings = Settings(force_emulation=True, qemu_system_binary=str(wrapper))
    try:
        with caplog.at_level(logging.WARNING, logger="exec_sandbox.sandbox.scheduler"):
            # Cold boots only: a snapshot restore would fall back to a boot by itself (no retry log).
            config = SchedulerConfig(enable_memory_snapshots=False)
            async with Scheduler(config, settings=settings, runtime_dir=runtime_dir) as sched:
                result = await sched.run("print('second boot')")
        assert result.stdout == "second boot\n"
        assert counter.read_text().count("x") == 2
        assert any("retrying once" in r.getMessage() for r in caplog.records)
        await assert_closed_clean(runtime_dir, ignore=others)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
