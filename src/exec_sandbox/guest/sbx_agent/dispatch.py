"""Routing: one table from request type to handler, and the error mapping around every handler.

``INLINE`` handlers run on the reader thread (cheap, or order-sensitive: upload chunks must be
written in arrival order, a reseed after a restore is on the critical path); ``WORKER`` handlers
run on a pooled worker thread, so a long exec never blocks the reader.
"""

from __future__ import annotations

from .core import AgentCore
from .wire import RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .wire import Msg

INLINE = {
    "ping": "op_ping",
    "write_file": "op_write_begin",
    "write_chunk": "op_write_chunk",
    "cancel": "op_cancel",
    "reseed_rng": "op_reseed_rng",
    "proc_input": "op_proc_input",
    "proc_close_stdin": "op_proc_close_stdin",
    "proc_resize": "op_proc_resize",
    "net_config": "op_net_config",
}
WORKER = {
    "exec": "op_exec",
    "read_file": "op_read_file",
    "list_files": "op_list_files",
    "warmup": "op_warmup",
    "shutdown": "op_shutdown",
    "proc_start": "op_proc_start",  # holds its worker for the process's life
    "proc_signal": "op_proc_signal",  # a SIGKILL waits for nothing, but other signals may
    "watch_dir": "op_watch_dir",  # holds its worker while the watch lasts
}


class DispatchOps(AgentCore):
    def dispatch(self, msg: Msg) -> None:
        req_id = msg.get("id")
        kind = msg.get("type")
        if not isinstance(req_id, str) or not req_id or len(req_id) > 128:
            if kind != "__invalid__":
                self.send(
                    {
                        "type": "error",
                        "id": None,
                        "code": "invalid_request",
                        "message": "request without a valid string id",
                    }
                )
            return
        try:
            if kind in INLINE:
                getattr(self, INLINE[kind])(req_id, msg)
            elif kind in WORKER:
                self.workers.submit(self._guarded, WORKER[kind], req_id, msg)
            else:
                raise RequestError("unknown_request", f"unknown request type {kind!r}")
        except RequestError as exc:
            self.send({"type": "error", "id": req_id, "code": exc.code, "message": exc.message})
        except Exception as exc:  # an agent bug must not kill the agent (it may be PID 1)
            self.send(
                {"type": "error", "id": req_id, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            )

    def _guarded(self, handler: str, req_id: str, msg: Msg) -> None:
        try:
            getattr(self, handler)(req_id, msg)
        except RequestError as exc:
            self.send({"type": "error", "id": req_id, "code": exc.code, "message": exc.message})
        except Exception as exc:  # an agent bug must not kill the agent
            self.send(
                {"type": "error", "id": req_id, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            )

    def op_ping(self, req_id: str, msg: Msg) -> None:
        self.send(self.hello(req_id))

    def op_cancel(self, req_id: str, msg: Msg) -> None:
        target = msg.get("target")
        found = isinstance(target, str) and 0 < len(target) <= 128 and self.cancel_request(target)
        self.send({"type": "cancel_result", "id": req_id, "found": found})
