"""One code execution inside a ready :class:`~exec_sandbox.vm.sandbox_vm.SandboxVm`, shared by
``Scheduler.run`` and ``Session.exec``.

What it adds on top of :meth:`SandboxVm.exec <exec_sandbox.vm.sandbox_vm.SandboxVm.exec>` (the one door
into the guest, which checks the VM state and merges the VM's env):

- output caps per stream (``max_output_bytes``); when the guest dropped output, a visible marker
  line is appended to that stream (and streamed to its callback) and ``*_truncated`` is set;
- OOM detection: a program that died by SIGKILL while the guest kernel logged an out-of-memory kill
  (the guest console carries kernel messages at error level) gets ``oom_killed=True`` and a stderr
  note naming the memory limit. The guest has only ``memory_mb`` of RAM, so a memory bomb is
  bounded by the guest kernel, never by the host;
- the host-side execute time and the QEMU process's CPU time over the exec (``cpu_seconds``);
- the wall-clock deadline, enforced by the host: whatever the guest does (agent hung, tmpfs full,
  vCPUs stopped), the call returns at most :data:`HOST_DEADLINE_GRACE_S` after ``timeout_s``. A
  guest that did not answer by then gets ``timed_out`` and ``guest_unresponsive``; its VM can no
  longer be trusted and the caller destroys it (``Scheduler.run`` retires it, a session closes).

Streaming callbacks may be sync or async; one that raises is logged and ignored (the run goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from exec_sandbox.callbacks import call_safely
from exec_sandbox.client.agent import ExecResult, OutputCallback
from exec_sandbox.errors import SandboxTransientError
from exec_sandbox.models import Language
from exec_sandbox.timing import elapsed_ms
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.spec import SandboxVmState

__all__ = [
    "HOST_DEADLINE_GRACE_S",
    "OOM_CONSOLE_PATTERN",
    "ExecOutcome",
    "download_problem",
    "execute_in_vm",
    "oom_note",
    "truncation_marker",
]

logger = logging.getLogger(__name__)

# Printed by the guest kernel (pr_err, so visible with "quiet") when its OOM killer picks a victim.
OOM_CONSOLE_PATTERN: Final = re.compile(
    r"Out of memory: Killed process \d+|oom-kill:|Memory cgroup out of memory"
)
_SIGKILL: Final = 9
# The console line can trail the agent's exit event by a little (different channels).
_OOM_CONSOLE_WAIT_S: Final = 1.5
# How long after the timeout the host waits for the agent's own timeout answer (it kills the
# exec's cgroup - milliseconds - and replies) before it ends the run itself.
HOST_DEADLINE_GRACE_S: Final = 1.5


def unresponsive_note(timeout_s: float) -> str:
    return (
        f"\n[sandbox] execution timed out after {timeout_s:g}s and the guest did not answer within "
        f"{HOST_DEADLINE_GRACE_S:g}s more; its VM was destroyed\n"
    )


def truncation_marker(stream: str, shown: int, total: int) -> str:
    return f"\n[sandbox] {stream} truncated: {total} bytes produced, only the first {shown} kept\n"


def oom_note(memory_mb: int) -> str:
    return (
        f"\n[sandbox] the program was killed by the guest's out-of-memory killer "
        f"(memory limit {memory_mb} MiB)\n"
    )


@dataclass(frozen=True)
class ExecOutcome:
    result: ExecResult
    stdout: str
    stderr: str
    oom_killed: bool
    execute_ms: float
    guest_unresponsive: bool = False  # the host ended the run at its deadline: destroy the VM
    cpu_seconds: float | None = None  # the VM's QEMU process CPU time over the exec

    def result_fields(self, vm: SandboxVm) -> dict[str, Any]:
        """The :class:`~exec_sandbox.models.ExecutionResult` fields this exec determines (one mapping
        for ``run()`` and ``Session.exec``; they add language, timing and their own fields)."""
        res = self.result
        return {
            "stdout": self.stdout,
            "stderr": self.stderr,
            "exit_code": res.exit_code,
            "execution_time_ms": max(res.duration_ms, 0.0),
            "timed_out": res.timed_out,
            "signal": res.signal,
            "stdout_truncated": res.stdout_truncated,
            "stderr_truncated": res.stderr_truncated,
            "vm_id": vm.vm_id,
            "accelerator": vm.accelerator.accel if vm.accelerator else None,
            "oom_killed": self.oom_killed,
            "cpu_seconds": self.cpu_seconds,
            "guest_unresponsive": self.guest_unresponsive,
        }


async def _notify(callback: OutputCallback | None, data: str) -> None:
    if callback is not None:
        await call_safely(callback, data, what="output", logger=logger)


async def _console_shows_oom(vm: SandboxVm, since: int) -> bool:
    console = vm.machine.console
    with contextlib.suppress(TimeoutError, EOFError):
        async with asyncio.timeout(_OOM_CONSOLE_WAIT_S):
            await console.wait_for(OOM_CONSOLE_PATTERN, since=since)
            return True
    return False


async def execute_in_vm(
    vm: SandboxVm,
    code: str,
    *,
    language: Language,
    session: bool,
    timeout_s: float,
    env: Mapping[str, str],
    max_output_bytes: int,
    memory_mb: int,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> ExecOutcome:
    """Run ``code`` in ``vm`` through :meth:`SandboxVm.exec` (its errors pass through unchanged)."""
    if vm.state is not SandboxVmState.READY:
        raise SandboxTransientError(
            f"sandbox VM {vm.vm_id} is not ready (state {vm.state.value!r})",
            context={"vm_id": vm.vm_id, "state": vm.state.value},
        )
    console_mark = vm.machine.console.total_bytes
    started = time.perf_counter()
    cpu_before = vm.cpu_seconds()
    # Output as it arrives, for the result of a run the host has to end itself.
    seen: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def collect(stream: str, callback: OutputCallback | None) -> OutputCallback:
        async def forward(data: str) -> None:
            seen[stream].append(data)
            await _notify(callback, data)

        return forward

    try:
        async with asyncio.timeout(timeout_s + HOST_DEADLINE_GRACE_S):
            result = await vm.exec(
                code,
                language=language,
                env=dict(env),
                timeout_s=timeout_s,
                session=session,
                max_stdout_bytes=max_output_bytes,
                max_stderr_bytes=max_output_bytes,
                on_stdout=collect("stdout", on_stdout),
                on_stderr=collect("stderr", on_stderr),
                # Never the one to give up first: the deadline above ends the run.
                reply_grace_s=HOST_DEADLINE_GRACE_S + 5.0,
                # run() VMs are single-use and sessions exec in their REPL: a replacement one-shot
                # interpreter would only cost guest CPU and ~15 MiB of TCG code cache.
                refill_spare=False,
            )
    except TimeoutError:
        execute_ms = elapsed_ms(started)
        logger.warning(
            "VM %s: no answer %.1fs after the %gs timeout; ending the run from the host",
            vm.vm_id, HOST_DEADLINE_GRACE_S, timeout_s,
        )
        note = unresponsive_note(timeout_s)
        await _notify(on_stderr, note)
        stdout, stderr = "".join(seen["stdout"]), "".join(seen["stderr"]) + note
        synthetic = ExecResult(
            stdout=stdout, stderr=stderr, exit_code=-1, timed_out=True, cancelled=False,
            session_reset=True, duration_ms=execute_ms, stdout_truncated=False, stderr_truncated=False,
            stdout_bytes=len(stdout.encode()), stderr_bytes=len(stderr.encode()), signal=None,
        )
        return ExecOutcome(result=synthetic, stdout=stdout, stderr=stderr, oom_killed=False,
                           execute_ms=execute_ms, guest_unresponsive=True,
                           cpu_seconds=_cpu_delta(vm, cpu_before))
    execute_ms = elapsed_ms(started)
    stdout, stderr = result.stdout, result.stderr
    # The outcome carries the output once: appending a marker below copies a stream (up to
    # max_output_bytes), so the result must not keep the unmarked copy alive next to it.
    result = dataclasses.replace(result, stdout="", stderr="")
    if result.stdout_truncated:
        marker = truncation_marker("stdout", max_output_bytes, result.stdout_bytes)
        stdout += marker
        await _notify(on_stdout, marker)
    if result.stderr_truncated:
        marker = truncation_marker("stderr", max_output_bytes, result.stderr_bytes)
        stderr += marker
        await _notify(on_stderr, marker)
    oom = False
    if result.signal == _SIGKILL and not result.timed_out and not result.cancelled:
        oom = await _console_shows_oom(vm, console_mark)
        if oom:
            note = oom_note(memory_mb)
            stderr += note
            await _notify(on_stderr, note)
    return ExecOutcome(result=result, stdout=stdout, stderr=stderr, oom_killed=oom, execute_ms=execute_ms,
                       cpu_seconds=_cpu_delta(vm, cpu_before))


def _cpu_delta(vm: SandboxVm, before: float | None) -> float | None:
    after = vm.cpu_seconds()
    if before is None or after is None:
        return None
    return round(max(after - before, 0.0), 3)


async def download_problem(vm: SandboxVm, rel: str, max_file_bytes: int) -> str | None:
    """Why ``rel`` cannot be downloaded into memory (None: it can): missing, not a file, too big."""
    parent, _, name = rel.rpartition("/")
    entries = await vm.agent.list_files(parent or ".")
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        return f"{rel!r} does not exist"
    if entry.is_dir:
        return f"{rel!r} is a directory"
    if entry.size > max_file_bytes:
        return f"{rel!r} is {entry.size} bytes, more than max_file_bytes ({max_file_bytes})"
    return None
