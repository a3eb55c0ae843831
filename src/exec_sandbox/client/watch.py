"""Directory watches in the guest, host side: :meth:`WatchControl.watch_dir` (inotify in the agent).

Bounded like every other request: the events wait in the request's byte-budgeted queue (a consumer
that stops reading back-pressures the guest, and is cut off after the connection's stall timeout
while other requests wait); each frame holds at most 1024 events.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from exec_sandbox.client.connection import AgentClientState, AgentConnection, build_model, unexpected_frame
from exec_sandbox.errors import SandboxError
from exec_sandbox.protocol.agent import CancelRequest
from exec_sandbox.protocol.process import WatchDirRequest, WatchEnd, WatchEvent, WatchEvents, WatchStarted

__all__ = ["WatchControl"]

_NO_DEADLINE = 10.0**9


class WatchControl(AgentConnection):
    """The agent client's directory watch (mixed into ``AgentClient``)."""

    async def watch_dir(self, path: str, *, recursive: bool = False,
                        start_timeout: float = 30.0) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of events under the guest directory ``path`` (absolute), from the first
        (empty) batch - yielded once the watch is in place - until the caller stops iterating
        (the watch is then cancelled) or the directory goes away (the iteration ends)."""
        request = build_model(WatchDirRequest, id=self._new_id(), path=path, recursive=recursive)
        async with self._request(request) as (req_id, pending):
            finished = False
            try:
                await self._expect(req_id, pending, WatchStarted, start_timeout)
                pending.completed = False
                yield []
                while True:
                    msg = await self._next(req_id, pending, _NO_DEADLINE)
                    if isinstance(msg, WatchEvents):
                        yield list(msg.events)
                    elif isinstance(msg, WatchEnd):
                        finished = pending.completed = True
                        return
                    else:
                        raise self._violation(unexpected_frame(req_id, msg, "watch_events/watch_end"))
            finally:
                if not finished and not pending.completed and self._state is AgentClientState.READY:
                    with contextlib.suppress(SandboxError, OSError, ConnectionError):
                        await self._send_and_forget(CancelRequest(id=self._new_id(), target=req_id))
