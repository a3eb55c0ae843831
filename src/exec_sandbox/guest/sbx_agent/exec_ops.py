"""Running code: argument checks, one-shot processes, pumping an interpreter's output."""

from __future__ import annotations

import os
import threading
import time

from .cgroups import Cgroups, kill_tree
from .core import AgentCore
from .procs import DEVNULL, exit_code_of
from .repl import drain_nonblocking
from .wire import DEFAULT_OUTPUT_CAP, LANG_EXT, MAX_CODE_BYTES, READ_CHUNK, RequestError, trace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .repl import Repl, Stream
    from .wire import Msg


class ExecBase(AgentCore):
    def _check_exec(self, msg: Msg) -> tuple[Any, ...]:
        lang = msg.get("language")
        if lang not in LANG_EXT:
            raise RequestError("invalid_request", f"unknown language {lang!r}")
        if not self.interpreters.get(lang):
            raise RequestError("unsupported_language", f"no interpreter for {lang!r} in this guest")
        code = msg.get("code")
        if not isinstance(code, str) or len(code.encode()) > MAX_CODE_BYTES or "\x00" in code:
            raise RequestError("invalid_request", "code must be a string without NUL, at most 2 MiB")
        env = msg.get("env") or {}
        if not isinstance(env, dict) or any(
            not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k or "\x00" in k + v
            for k, v in env.items()
        ):
            raise RequestError("invalid_request", "env must map names to strings (no '=' or NUL)")
        timeout = msg.get("timeout_s", 30)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise RequestError("invalid_request", "timeout_s must be in (0, 86400]")
        caps = []
        for key in ("max_stdout_bytes", "max_stderr_bytes"):
            cap = msg.get(key, DEFAULT_OUTPUT_CAP)
            if not isinstance(cap, int) or cap < 0:
                raise RequestError("invalid_request", f"{key} must be a non-negative integer")
            caps.append(cap)
        cwd = self.workdir
        if msg.get("cwd"):
            cwd = self.resolve_dir(msg["cwd"])
        return lang, code, env, float(timeout), caps, cwd

    def _exec_oneshot(self, req_id: str, lang: str, code: str, env: dict[str, str], timeout: float,
                      cwd: str, out: Stream, err: Stream) -> Msg:
        import select

        path = self.write_code_file(lang, code)
        interp = self.interpreters[lang]
        argv = {
            "python": lambda: [interp, "-u", path],
            "javascript": lambda: [interp, path],
            "raw": lambda: [*interp, path],
        }[lang]()
        cancelled = threading.Event()
        trace("one-shot exec: spawning")
        cgroups = self.cgroups
        exec_cg = cgroups.create("exec") if cgroups is not None else None
        try:
            proc = self.spawn(argv, env=self.base_env(env), cwd=cwd, stdin=DEVNULL, cgroup=exec_cg)
        except OSError as exc:
            os.unlink(path)
            if exec_cg is not None and cgroups is not None:
                cgroups.kill(exec_cg)
            raise RequestError("spawn_failed", f"cannot start {lang}: {exc}") from None
        trace("one-shot exec: spawned")
        self.register(req_id, cancelled.set)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None and proc.stderr is not None
        fds = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        status = None
        timed_out = False
        exited_at = None
        try:
            while fds:
                now = time.monotonic()
                if status is None:
                    status = self.reaper.poll(proc.pid)
                    if status is not None:
                        exited_at = now
                if now >= deadline or cancelled.is_set():
                    timed_out = not cancelled.is_set()
                    break
                # The main process is gone but a background child holds the pipes: stop shortly.
                if exited_at is not None and now - exited_at > 0.2:
                    break
                ready, _, _ = select.select(list(fds), [], [], min(0.05, max(0.0, deadline - now)))
                for fd in ready:
                    data = os.read(fd, READ_CHUNK)
                    if data:
                        fds[fd].feed(data)
                    else:
                        del fds[fd]
            if not timed_out and not cancelled.is_set() and status is None:
                status = self.reaper.wait(proc.pid, max(0.0, deadline - time.monotonic()))
                timed_out = status is None
            trace("one-shot exec: exited")
            # Leftovers (background children, or everything on timeout) die with the exec.
            if exec_cg is not None and cgroups is not None:
                cgroups.kill(exec_cg)
            else:
                kill_tree(proc.pid, self.protected_pids, self.run_uid, self.spawn_lock)
            trace("one-shot exec: tree killed")
            if status is None:
                status = self.reaper.wait(proc.pid, 5.0)
            for fd in list(fds):
                drain_nonblocking(fd, fds[fd])
        finally:
            self.unregister(req_id)
            proc.returncode = status if status is not None else -9
            proc.stdout.close()
            proc.stderr.close()
            self.forget_pid(proc.pid)
            try:
                os.unlink(path)
            except OSError:
                pass
        if timed_out or cancelled.is_set():
            why = "timed out" if timed_out else "was cancelled"
            err.note(
                f"\n[sandbox] execution {why} after {timeout:g}s; the process tree was killed\n"
                if timed_out
                else "\n[sandbox] execution was cancelled; the process tree was killed\n"
            )
            return {
                "exit_code": -1,
                "signal": None,
                "timed_out": timed_out,
                "cancelled": cancelled.is_set(),
                "session_reset": False,
            }
        code_, sig = exit_code_of(status) if status is not None else (-1, None)
        return {
            "exit_code": code_,
            "signal": sig,
            "timed_out": False,
            "cancelled": False,
            "session_reset": False,
        }

    def _enter_block(self, repl: Repl) -> None:
        """A session block runs in a cgroup of its own: what it starts cannot outlive it."""
        cgroups = self.cgroups
        if cgroups is None or repl.cg is None or repl.proc is None:
            return
        exec_cg = cgroups.create("exec")
        try:
            Cgroups.move(exec_cg, repl.proc.pid)
        except OSError:
            cgroups.remove(exec_cg)
            return
        repl.exec_cg = exec_cg

    def _leave_block(self, repl: Repl) -> None:
        """The interpreter goes back to its own group; everything else the block started dies."""
        cgroups = self.cgroups
        exec_cg = repl.exec_cg
        if cgroups is None or exec_cg is None:
            return
        repl.exec_cg = None
        if repl.proc is not None and repl.cg is not None:
            try:
                Cgroups.move(repl.cg, repl.proc.pid)
            except OSError:
                pass
            # Anything the interpreter itself started while at rest (threads, JS timers) goes too.
            cgroups.kill_others(repl.cg, repl.proc.pid)
        cgroups.kill(exec_cg)

    def _await_repl(self, repl: Repl, out: Stream | None, err: Stream | None, deadline: float,
                    cancelled: threading.Event) -> tuple[str, int | None]:
        """Pump a REPL until its status line ("done"), its death ("died"), timeout or cancel."""
        import select

        proc = repl.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        status_fd = repl.status_r
        while True:
            now = time.monotonic()
            if now >= deadline or cancelled.is_set():
                for fd, s in streams.items():
                    drain_nonblocking(fd, s)
                repl.stop()
                return ("timeout" if not cancelled.is_set() else "cancelled", None)
            ready, _, _ = select.select([*streams, status_fd], [], [], min(0.1, deadline - now))
            for fd in ready:
                if fd == status_fd:
                    continue
                drain_nonblocking(fd, streams[fd])
            if status_fd in ready:
                try:
                    rc = repl.read_status()
                except EOFError:
                    for fd, s in streams.items():
                        drain_nonblocking(fd, s)
                    status = self.reaper.wait(proc.pid, 2.0)
                    proc.returncode = status if status is not None else -9
                    repl.stop()
                    return ("died", status)
                if rc is not None:
                    # The driver flushed before writing the status: output is already in the pipes.
                    for fd, s in streams.items():
                        drain_nonblocking(fd, s)
                    return ("done", rc)

