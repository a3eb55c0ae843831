"""Hostile code through the public API: every case ends with a clear result, the host unharmed and
clean (no guest, overlay or socket left; host process count and our memory sane).

Real guests under TCG, one module-scoped Scheduler with the default output cap (10 MiB/stream).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from exec_sandbox.protocol.agent import DEFAULT_OUTPUT_CAP_BYTES
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.integration.test_scheduler_support import (
    assert_no_vms,
    host_process_count,
    rss_mb,
    scheduler_for_tests,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests() as sched:
        yield sched


async def test_cpu_spin_is_stopped_by_the_timeout(scheduler: Scheduler) -> None:
    result = await scheduler.run("while :; do :; done", language="raw", timeout_seconds=3)
    assert result.timed_out and result.exit_code == -1
    assert "[sandbox] execution timed out after 3s" in result.stderr
    await assert_no_vms(scheduler)


async def test_fork_bomb_is_bounded(scheduler: Scheduler) -> None:
    before = host_process_count()
    result = await scheduler.run(
        "bomb() { bomb | bomb & }; bomb; sleep 20", language="raw", timeout_seconds=10
    )
    # However it ends (the process cap makes forks fail; the timeout kills the rest), it ends.
    assert result.timed_out or result.exit_code != 0 or "fork" in result.stderr.lower()
    follow_up = await scheduler.run("print('host fine')")
    assert follow_up.stdout == "host fine\n"
    # An unbounded bomb on the host would add thousands; other engineers' work adds a few.
    assert host_process_count() - before < 100
    await assert_no_vms(scheduler)


async def test_memory_bomb_is_oom_killed_in_the_guest(scheduler: Scheduler) -> None:
    rss_before = rss_mb()
    result = await scheduler.run(
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (4 * 1024 * 1024))",
        memory_mb=128,
        timeout_seconds=120,
    )
    assert result.oom_killed, (result.exit_code, result.signal, result.stderr)
    assert (result.signal, result.exit_code, result.timed_out) == (9, 137, False)
    assert "out-of-memory killer (memory limit 128 MiB)" in result.stderr
    assert not result.success
    assert rss_mb() - rss_before < 100
    await assert_no_vms(scheduler)  # the run's VM is stopped in the background after the result
    assert scheduler.admission.stats().memory_in_use_mb == 0


async def test_50_mb_of_output_is_capped_and_flagged(scheduler: Scheduler) -> None:
    rss_before = rss_mb()
    streamed = 0

    def count(data: str) -> None:
        nonlocal streamed
        streamed += len(data)

    result = await scheduler.run(
        "import sys\nline = 'x' * 1023 + '\\n'\nblock = line * 1024\n"
        "for _ in range(50):\n    sys.stdout.write(block)\n"
        "sys.stdout.flush()\nprint('done', file=sys.stderr)",
        on_stdout=count,
        timeout_seconds=240,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout_truncated and not result.stderr_truncated
    marker = f"[sandbox] stdout truncated: {50 * 1024 * 1024} bytes produced, only the first"
    assert marker in result.stdout
    assert result.stdout.startswith("x" * 1023 + "\n")
    kept = result.stdout[: result.stdout.index("\n[sandbox]")]
    assert len(kept) == DEFAULT_OUTPUT_CAP_BYTES
    assert streamed == len(result.stdout)  # the marker is streamed too
    assert result.stderr == "done\n"
    assert rss_mb() - rss_before < 400
    await assert_no_vms(scheduler)


async def test_proc_and_host_files_show_only_the_guest(scheduler: Scheduler) -> None:
    code = (
        "import os, socket\n"
        "print('cpu', 'QEMU' in open('/proc/cpuinfo').read())\n"
        "print('host', socket.gethostname())\n"
        "print('work', os.path.exists('/work'), os.path.exists('/work/main/pyproject.toml'))\n"
        "print('init', open('/proc/1/cmdline', 'rb').read().replace(b'\\0', b' ').decode().strip())\n"
        "print('procs', len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        "print('mem', int(open('/proc/meminfo').readline().split()[1]) // 1024)\n"
    )
    result = await scheduler.run(code, memory_mb=192)
    assert result.exit_code == 0, result.stderr
    seen = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert seen["cpu"] == "True"
    assert seen["host"] != socket.gethostname()
    assert seen["work"] == "False False"
    assert "sbx_agent" in seen["init"]
    assert int(seen["procs"]) < 100
    assert int(seen["mem"]) <= 192
    await assert_no_vms(scheduler)


async def test_user_code_cannot_write_outside_or_kill_the_agent(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="raw") as s:
        r = await s.exec(
            "id -u\n"
            "for f in /etc/passwd /opt/sbx/sbx_agent/core.py /root/x /x /usr/bin/python3; do\n"
            '  if (echo pwned > "$f") 2>/dev/null; then echo "wrote $f"; else echo "refused $f"; fi\n'
            "done\n"
            "echo mine > /home/sandbox/mine && echo 'wrote mine'\n"
        )
        assert r.stdout.splitlines() == [
            "1000",
            "refused /etc/passwd",
            "refused /opt/sbx/sbx_agent/core.py",
            "refused /root/x",
            "refused /x",
            "refused /usr/bin/python3",
            "wrote mine",
        ]
        r = await s.exec("kill -9 1; echo rc=$?")
        assert "rc=1" in r.stdout
        await s.exec("sleep 1000 &")
        # kill(-1) reaches every process uid 1000 may signal (except the caller): only its own.
        r = await s.exec("kill -9 -1; echo shell-survives")
        assert r.stdout == "shell-survives\n"
        r = await s.exec("echo alive; cat /proc/1/comm; pgrep -u 1000 sleep || echo no-sleep")
        assert r.stdout.splitlines()[0] == "alive"
        assert "no-sleep" in r.stdout
        assert await s.read_file("mine") == b"mine\n"
    await assert_no_vms(scheduler)


async def test_memory_bomb_in_a_session_resets_only_the_interpreter(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python", memory_mb=128) as s:
        await s.exec("kept = 'before'")
        await s.write_file("survives.txt", b"files stay")
        bomb = "hog = []\nwhile True:\n    hog.append(b'y' * (4 * 1024 * 1024))"
        r = await s.exec(bomb, timeout_seconds=120)
        assert r.oom_killed and r.signal == 9, (r.exit_code, r.stderr)
        assert "out-of-memory killer (memory limit 128 MiB)" in r.stderr
        assert "state was reset" in r.stderr
        r = await s.exec("print('kept' in globals(), open('survives.txt').read())")
        assert r.stdout == "False files stay\n"
        assert s.exec_count == 3
    await assert_no_vms(scheduler)
