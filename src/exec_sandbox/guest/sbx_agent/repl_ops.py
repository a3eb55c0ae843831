"""Execs in persistent interpreters: the session REPLs and the spare one-shot interpreters."""

from __future__ import annotations

import os
import threading
import time

from .exec_ops import ExecBase
from .procs import exit_code_of
from .repl import Repl, Stream, session_prefix
from .wire import RequestError, trace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .wire import Msg


class ReplOps(ExecBase):
    def op_exec(self, req_id: str, msg: Msg) -> None:
        trace("exec received")
        lang, code, env, timeout, caps, cwd = self._check_exec(msg)
        out = Stream(self, req_id, "stdout", caps[0])
        err = Stream(self, req_id, "stderr", caps[1])
        started = time.monotonic()
        used_spare: Repl | None = None
        if self.take_early_cancel(req_id):
            result = self._not_run(err)
        elif msg.get("session"):
            result = self._exec_session(req_id, lang, code, env, timeout, cwd, out, err)
        else:
            used_spare = self._take_spare(lang)
            if used_spare is not None:
                result = self._exec_in_spare(req_id, used_spare, lang, code, env, timeout, cwd, out, err)
            else:
                result = self._exec_oneshot(req_id, lang, code, env, timeout, cwd, out, err)
        out.flush()
        err.flush()
        result.update(
            {
                "type": "exit",
                "id": req_id,
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "stdout_truncated": out.truncated,
                "stderr_truncated": err.truncated,
                "stdout_bytes": out.total,
                "stderr_bytes": err.total,
            }
        )
        self.send(result)
        trace("exec replied")
        if used_spare is not None and msg.get("prime_spare") is True and self._keep_spare(lang, used_spare):
            return  # a warm-up block of the host's own: the spare stays, now with its paths translated
        if used_spare is not None:
            # A used spare dies only after the reply: its output is complete once it reported
            # "done", and killing its tree (a /proc walk) costs ~10 ms of guest CPU under TCG, which
            # must not hold the GIL before the writer thread has taken the reply.
            self.flush_out(0.05)
            with used_spare.lock:
                used_spare.stop()
        if not msg.get("session") and lang in self.spare_langs and msg.get("refill_spare") is not False:
            # After the reply: starting an interpreter competes for the guest's CPU with sending it.
            self.flush_out(0.05)
            self.ensure_spare(lang)

    @staticmethod
    def _not_run(err: Stream) -> Msg:
        """The reply to an exec cancelled before it started: nothing ran, no state was lost."""
        err.note("\n[sandbox] execution was cancelled before it started\n")
        return {"exit_code": -1, "signal": None, "timed_out": False, "cancelled": True,
                "session_reset": False}

    # ---- spare interpreters (fresh process per one-shot exec, without the interpreter start-up)

    def ensure_spare(self, lang: str) -> None:
        """Start a spare interpreter for ``lang`` in the background unless one exists or is starting."""
        if lang not in ("python", "javascript") or not self.interpreters.get(lang):
            return
        with self.spare_cond:
            if lang in self.spares or lang in self.spare_starting:
                return
            self.spare_starting.add(lang)
        threading.Thread(target=self._start_spare, args=(lang,), daemon=True).start()

    def _start_spare(self, lang: str) -> None:
        repl = Repl(self, lang)
        ok = kept = False
        with self.spare_cond:
            epoch = self.rng_epoch
        try:
            with repl.lock:
                repl.start()
                repl.submit("")
                outcome = self._await_repl(repl, None, None, time.monotonic() + 120, threading.Event())
                ok = outcome[0] == "done"
                # A reseed_rng that arrived while this spare was starting did not see it: catch up.
                while ok:
                    with self.spare_cond:
                        if self.rng_epoch == epoch:
                            break
                        epoch = self.rng_epoch
                    self._reseed_locked(lang, repl)
                    ok = repl.alive()
        except Exception:
            ok = False
        with self.spare_cond:
            self.spare_starting.discard(lang)
            if ok and lang in self.spare_langs and self.rng_epoch == epoch:
                self.spares[lang] = repl
                kept = True
            self.spare_cond.notify_all()
        if not kept:
            repl.stop()

    def _keep_spare(self, lang: str, repl: Repl) -> bool:
        """Put a spare that ran a priming block back (unless it died, or another took its place)."""
        with self.spare_cond:
            if not repl.alive() or lang in self.spares or lang not in self.spare_langs:
                return False
            if repl.can_reseed:
                repl.reseed_pending = True  # cheap insurance: it was out of self.spares for a while
            self.spares[lang] = repl
            self.spare_cond.notify_all()
            return True

    def _take_spare(self, lang: str, wait_s: float = 60.0) -> Repl | None:
        deadline = time.monotonic() + wait_s
        with self.spare_cond:
            # A spare being started is already part-way through its start-up: waiting beats a cold start.
            while lang not in self.spares and lang in self.spare_starting and time.monotonic() < deadline:
                self.spare_cond.wait(0.5)
            repl = self.spares.pop(lang, None)
        return repl if repl is not None and repl.alive() else None

    def _exec_in_spare(self, req_id: str, repl: Repl, lang: str, code: str, env: dict[str, str],
                       timeout: float, cwd: str, out: Stream, err: Stream) -> Msg:
        cancelled = threading.Event()
        with repl.lock:
            if not repl.alive():  # died while being reseeded: a plain one-shot run instead
                return self._exec_oneshot(req_id, lang, code, env, timeout, cwd, out, err)
            repl.submit(session_prefix(lang, env, cwd, self.workdir) + code)
            self.register(req_id, cancelled.set)
            try:
                kind, value = self._await_repl(repl, out, err, time.monotonic() + timeout, cancelled)
            except BaseException:
                repl.stop()
                raise
            finally:
                self.unregister(req_id)
            # Used once: op_exec stops the interpreter and anything it left behind after replying.
        if kind == "done":
            return {"exit_code": value, "signal": None, "timed_out": False, "cancelled": False,
                    "session_reset": False}
        if kind == "died":  # e.g. os._exit(3) / process.exit(3): an ordinary end for a one-shot run
            code_, sig = exit_code_of(value) if value is not None else (-1, None)
            return {"exit_code": code_, "signal": sig, "timed_out": False, "cancelled": False,
                    "session_reset": False}
        timed_out = kind == "timeout"
        err.note(f"\n[sandbox] execution timed out after {timeout:g}s; the process tree was killed\n"
                 if timed_out else "\n[sandbox] execution was cancelled; the process tree was killed\n")
        return {"exit_code": -1, "signal": None, "timed_out": timed_out, "cancelled": not timed_out,
                "session_reset": False}

    def _wait_spare(self, lang: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.spare_cond:
            while lang not in self.spares and lang in self.spare_starting and time.monotonic() < deadline:
                self.spare_cond.wait(0.5)
            return lang in self.spares

    def repl_for(self, lang: str) -> Repl:
        with self.repl_guard:
            repl = self.repls.get(lang)
            if repl is None:
                repl = self.repls[lang] = Repl(self, lang)
        with repl.lock:
            if not repl.alive():
                repl.start()
                # Run an empty block so "warm" means the interpreter is fully loaded.
                repl.submit("")
                self._await_repl(repl, None, None, time.monotonic() + 60, threading.Event())
                if repl.pending_file:
                    try:
                        os.unlink(repl.pending_file)
                    except OSError:
                        pass
        return repl

    def _exec_session(self, req_id: str, lang: str, code: str, env: dict[str, str], timeout: float,
                      cwd: str, out: Stream, err: Stream) -> Msg:
        if not self.interpreters.get(lang):
            raise RequestError("unsupported_language", f"no interpreter for {lang!r}")
        repl = self.repl_for(lang)
        cancelled = threading.Event()
        with repl.lock:
            if not repl.alive():
                repl.start()
            if self.take_early_cancel(req_id):  # cancelled while it waited for the session
                return self._not_run(err)
            prefix = session_prefix(lang, env, cwd, self.workdir)
            self._enter_block(repl)
            repl.submit(prefix + code)
            self.register(req_id, cancelled.set)
            try:
                outcome = self._await_repl(repl, out, err, time.monotonic() + timeout, cancelled)
            finally:
                self.unregister(req_id)
                self._leave_block(repl)
                if repl.pending_file:
                    try:
                        os.unlink(repl.pending_file)
                    except OSError:
                        pass
        kind, value = outcome
        if kind == "done":
            return {
                "exit_code": value,
                "signal": None,
                "timed_out": False,
                "cancelled": False,
                "session_reset": False,
            }
        if kind == "died":
            code_, sig = exit_code_of(value) if value is not None else (-1, None)
            err.note("\n[sandbox] the session interpreter exited; its state was reset\n")
            return {
                "exit_code": code_,
                "signal": sig,
                "timed_out": False,
                "cancelled": False,
                "session_reset": True,
            }
        why = "timed out" if kind == "timeout" else "was cancelled"
        err.note(
            f"\n[sandbox] execution {why} after {timeout:g}s; the session was restarted and its "
            "state was lost\n"
            if kind == "timeout"
            else "\n[sandbox] execution was cancelled; the session was restarted and its state was lost\n"
        )
        return {
            "exit_code": -1,
            "signal": None,
            "timed_out": kind == "timeout",
            "cancelled": kind == "cancelled",
            "session_reset": True,
        }

    def _reseed_locked(self, lang: str, repl: Repl) -> None:
        if not repl.alive():
            return
        if repl.can_reseed:
            repl.reseed_pending = True
        elif lang == "javascript":
            # V8 cannot reseed Math.random: start a fresh interpreter (a warm one holds no state).
            repl.stop()
            repl.start()
            repl.submit("")
            self._await_repl(repl, None, None, time.monotonic() + 60, threading.Event())
