"""Background processes: started by ``proc_start``, running beside every other request.

The request's id names the process's stream for its whole life (the host's models are in
``exec_sandbox.protocol.process``)::

    proc_start {argv, env, cwd, root, stdin, pty: {rows, cols} | null, max_output_bytes, timeout_s}
      -> proc_started {pid}, proc_output {stream, data (base64)}..., proc_exit {...}
    proc_input {pid, data (base64)} | proc_close_stdin {pid} | proc_resize {pid, rows, cols}
      | proc_signal {pid, signal}                                              -> proc_ack
    cancel {target: the proc_start id}: the process's whole group is killed

Each process lives in a cgroup of its own (like a one-shot exec): SIGKILL, a cancel, its deadline or
the end of its main process (0.2 s grace for output) kill everything it started. Output goes out as
it is read; the bounded output queue of the agent back-pressures a flooding process. Its stdin (a
pipe, or the pty) is written by a thread of its own from a bounded inbox, so a process that does
not read its input never blocks the agent's reader.
"""

from __future__ import annotations

import os
import threading
import time

from .cgroups import kill_tree
from .core import AgentCore
from .procs import DEVNULL, exit_code_of
from .wire import DEFAULT_OUTPUT_CAP, MAX_CODE_BYTES, READ_CHUNK, RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .procs import Proc
    from .wire import Msg

MAX_INBOX = 1024 * 1024  # stdin bytes queued per process before input is refused ("stdin_full")
MAX_ARGS = 4096
EXIT_GRACE_S = 0.2  # output read after the main process exited, before its group is killed


class BgProc:
    """One running background process, as the handlers share it."""

    def __init__(self, req_id: str, pid: int, cg: str | None, master: int, writer_fd: int) -> None:
        self.req_id = req_id
        self.pid = pid
        self.cg = cg
        self.master = master  # the pty's master (read by the pump; closed by it, under cond) or -1
        self.writer_fd = writer_fd  # owned by the stdin writer thread; -1 without stdin
        self.cond = threading.Condition()
        self.inbox: list[bytes] = []
        self.inbox_bytes = 0
        self.eof = writer_fd < 0
        self.killed = threading.Event()
        self.silent = False  # started for an earlier host connection: nothing more is sent


def _check_env(env: object) -> dict[str, str]:
    if not isinstance(env, dict) or any(
        not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k or "\x00" in k + v
        for k, v in env.items()
    ):
        raise RequestError("invalid_request", "env must map names to strings (no '=' or NUL)")
    return env


class ProcOps(AgentCore):
    def _check_proc(self, msg: Msg) -> tuple[Any, ...]:
        argv = msg.get("argv")
        if (not isinstance(argv, list) or not 0 < len(argv) <= MAX_ARGS
                or not all(isinstance(a, str) and "\x00" not in a for a in argv) or not argv[0]
                or sum(len(a) for a in argv) > MAX_CODE_BYTES):
            raise RequestError("invalid_request", "argv must be 1..4096 strings without NUL, at most 2 MiB")
        env = _check_env(msg.get("env") or {})
        cwd = msg.get("cwd") or self.workdir
        if not isinstance(cwd, str) or "\x00" in cwd:
            raise RequestError("invalid_request", "cwd must be a string")
        cwd = os.path.join(self.workdir, cwd)  # relative: from the work dir
        if not os.path.isdir(cwd):
            raise RequestError("not_found", f"cwd {cwd!r} is not a directory")
        pty = msg.get("pty")
        if pty is not None:
            rows, cols = (pty.get("rows"), pty.get("cols")) if isinstance(pty, dict) else (None, None)
            if not all(isinstance(v, int) and 0 < v <= 10000 for v in (rows, cols)):
                raise RequestError("invalid_request", "pty needs rows and cols in 1..10000")
            pty = (rows, cols)
        cap = msg.get("max_output_bytes", DEFAULT_OUTPUT_CAP)
        if not isinstance(cap, int) or cap < 0:
            raise RequestError("invalid_request", "max_output_bytes must be a non-negative integer")
        timeout = msg.get("timeout_s")
        if timeout is not None and (not isinstance(timeout, (int, float)) or not 0 < timeout <= 30 * 86400):
            raise RequestError("invalid_request", "timeout_s must be in (0, 2592000] or null")
        return argv, env, cwd, msg.get("root") is True, msg.get("stdin") is True, pty, cap, timeout

    def op_proc_start(self, req_id: str, msg: Msg) -> None:
        argv, env, cwd, root, want_stdin, pty, cap, timeout = self._check_proc(msg)
        if self.take_early_cancel(req_id):
            raise RequestError("cancelled", "the process was cancelled before it started")
        uid = None if root else self.run_uid
        gid = self.run_gid if uid is not None else None
        cgroups = self.cgroups
        cg = cgroups.create("proc") if cgroups is not None else None
        master = slave = stdin_r = stdin_w = -1
        try:
            if pty is not None:
                from .ptys import open_pty

                master, slave = open_pty(pty[0], pty[1], uid, gid)
            elif want_stdin:
                stdin_r, stdin_w = os.pipe()
                if uid is not None:  # like its stdout: /dev/stdin re-opens through /proc
                    os.fchown(stdin_r, uid, gid if gid is not None else -1)
            proc = self.spawn(argv, env=self.base_env(env), cwd=cwd,
                              stdin=stdin_r if stdin_r >= 0 else DEVNULL, cgroup=cg, as_root=root,
                              pty_slave=slave)
        except OSError as exc:
            for fd in (master, stdin_w):
                if fd >= 0:
                    os.close(fd)
            if cg is not None and cgroups is not None:
                cgroups.kill(cg)
            raise RequestError("spawn_failed", f"cannot start {argv[0]!r}: {exc}") from None
        finally:
            for fd in (slave, stdin_r):
                if fd >= 0:
                    os.close(fd)
        writer_fd = stdin_w if stdin_w >= 0 else (os.dup(master) if master >= 0 else -1)
        bp = BgProc(req_id, proc.pid, cg, master, writer_fd)
        if writer_fd >= 0:
            threading.Thread(target=self._stdin_writer, args=(bp,), name=f"stdin-{proc.pid}",
                             daemon=True).start()
        with self.bg_lock:
            self.bg[proc.pid] = bp
        self.register(req_id, lambda: self._kill_bg(bp))
        self.send({"type": "proc_started", "id": req_id, "pid": proc.pid})
        try:
            result = self._pump_bg(bp, proc, cap, timeout)
        finally:
            self.unregister(req_id)
            with self.bg_lock:
                self.bg.pop(proc.pid, None)
            with bp.cond:
                bp.eof = True
                bp.inbox.clear()
                bp.inbox_bytes = 0
                bp.cond.notify_all()
            self.forget_pid(proc.pid)
        if not bp.silent:
            self.send(result)

    def _pump_bg(self, bp: BgProc, proc: Proc, cap: int, timeout: float | None) -> Msg:
        """Forward the process's output until it is over; returns its ``proc_exit`` message."""
        import select
        from binascii import b2a_base64

        if bp.master >= 0:
            fds = {bp.master: "pty"}
        else:
            assert proc.stdout is not None and proc.stderr is not None
            fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        sent = {"stdout": 0, "stderr": 0, "pty": 0}
        total = dict(sent)
        truncated: set[str] = set()

        def forward(fd: int) -> bool:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return False
            except OSError:  # EIO: the pty's last slave closed
                data = b""
            if not data:
                del fds[fd]
                return False
            name = fds[fd]
            total[name] += len(data)
            room = cap - sent[name]
            if len(data) > room:
                data = data[:max(room, 0)]
                truncated.add(name)
            if data and not bp.silent:
                sent[name] += len(data)
                self.send({"type": "proc_output", "id": bp.req_id, "stream": name,
                           "data": b2a_base64(data, newline=False).decode()})
            return True

        deadline = None if timeout is None else time.monotonic() + timeout
        status = exited_at = None
        timed_out = False
        try:
            while True:
                now = time.monotonic()
                if status is None:
                    status = self.reaper.poll(proc.pid)
                    if status is not None:
                        exited_at = now
                if bp.killed.is_set():
                    break
                if deadline is not None and now >= deadline:
                    timed_out = True
                    break
                if exited_at is not None and (not fds or now - exited_at > EXIT_GRACE_S):
                    break
                wait = 0.05 if deadline is None else min(0.05, max(0.0, deadline - now))
                if not fds:
                    bp.killed.wait(wait)
                    continue
                ready, _, _ = select.select(list(fds), [], [], wait)
                for fd in ready:
                    forward(fd)
            # Whatever is left of its group (background children, or everything) dies with it.
            self._kill_bg(bp, wait=True)
            if status is None:
                status = self.reaper.wait(proc.pid, 5.0)
            for fd in list(fds):
                os.set_blocking(fd, False)
                while fd in fds and forward(fd):
                    pass
        finally:
            with bp.cond:
                if bp.master >= 0:
                    os.close(bp.master)
                    bp.master = -1
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.returncode = status if status is not None else -9
        code, sig = exit_code_of(status) if status is not None else (-1, 9)
        return {
            "type": "proc_exit", "id": bp.req_id, "pid": bp.pid, "exit_code": code, "signal": sig,
            "killed": bp.killed.is_set() and not timed_out, "timed_out": timed_out,
            "stdout_bytes": total["stdout"] + total["pty"], "stderr_bytes": total["stderr"],
            "truncated": sorted(truncated),
        }

    def _kill_bg(self, bp: BgProc, *, wait: bool = False) -> None:
        """SIGKILL the process's whole group (``wait``: until it is empty, then remove it)."""
        if not wait:
            bp.killed.set()
        cgroups = self.cgroups
        if bp.cg is not None and cgroups is not None:
            if wait:
                cgroups.kill(bp.cg)
            else:
                try:
                    fd = os.open(os.path.join(bp.cg, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, b"1")
                    finally:
                        os.close(fd)
                except OSError:
                    pass
        else:
            kill_tree(bp.pid, self.protected_pids, self.run_uid, self.spawn_lock)

    def _stdin_writer(self, bp: BgProc) -> None:
        fd = bp.writer_fd
        try:
            while True:
                with bp.cond:
                    while not bp.inbox and not bp.eof:
                        bp.cond.wait()
                    if not bp.inbox:
                        return
                    data = bp.inbox.pop(0)
                    bp.inbox_bytes -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        except OSError:  # the reader is gone (EPIPE, EIO)
            pass
        finally:
            with bp.cond:
                bp.eof = True
                bp.inbox.clear()
                bp.inbox_bytes = 0
            os.close(fd)

    # ---- the inline requests (reader thread: nothing here may block)

    def _bg_of(self, msg: Msg) -> BgProc:
        pid = msg.get("pid")
        with self.bg_lock:
            bp: BgProc | None = self.bg.get(pid) if isinstance(pid, int) else None
        if bp is None:
            raise RequestError("not_found", f"no running process {pid!r}")
        return bp

    def _ack(self, req_id: str) -> None:
        self.send({"type": "proc_ack", "id": req_id})

    def op_proc_input(self, req_id: str, msg: Msg) -> None:
        from binascii import Error, a2b_base64

        bp = self._bg_of(msg)
        raw = msg.get("data")
        try:
            data = a2b_base64(raw) if isinstance(raw, str) else None
        except (Error, ValueError):
            data = None
        if data is None:
            raise RequestError("invalid_request", "data must be base64")
        with bp.cond:
            if bp.writer_fd < 0:
                raise RequestError("no_stdin", "the process was started without stdin")
            if bp.eof:
                raise RequestError("stdin_closed", "the process's stdin is closed")
            if bp.inbox and bp.inbox_bytes + len(data) > MAX_INBOX:
                raise RequestError("stdin_full", "the process is not reading its stdin; try again later")
            if data:
                bp.inbox.append(data)
                bp.inbox_bytes += len(data)
                bp.cond.notify_all()
        self._ack(req_id)

    def op_proc_close_stdin(self, req_id: str, msg: Msg) -> None:
        bp = self._bg_of(msg)
        with bp.cond:
            bp.eof = True
            bp.cond.notify_all()
        self._ack(req_id)

    def op_proc_resize(self, req_id: str, msg: Msg) -> None:
        from .ptys import set_size

        bp = self._bg_of(msg)
        rows, cols = msg.get("rows"), msg.get("cols")
        if not (isinstance(rows, int) and isinstance(cols, int) and 0 < rows <= 10000 and 0 < cols <= 10000):
            raise RequestError("invalid_request", "rows and cols must be in 1..10000")
        with bp.cond:
            if bp.master < 0:
                raise RequestError("no_pty", "the process has no terminal")
            set_size(bp.master, rows, cols)
        self._ack(req_id)

    def op_proc_signal(self, req_id: str, msg: Msg) -> None:
        bp = self._bg_of(msg)
        sig = msg.get("signal")
        if not isinstance(sig, int) or not 0 < sig < 65:
            raise RequestError("invalid_request", "signal must be 1..64")
        if sig == 9:
            self._kill_bg(bp)
        else:
            try:
                os.killpg(bp.pid, sig)
            except OSError:
                pass
        self._ack(req_id)

    def _greet(self) -> None:
        """A new host connection (a restore, a fork) follows none of the processes started for the
        last one: they would send to request ids it never made. They are killed, silently."""
        with self.bg_lock:
            stale = list(self.bg.values())
        for bp in stale:
            bp.silent = True
            self._kill_bg(bp)
        super()._greet()
