"""Renders image-build progress on a rich console (used by ``sbx images build`` and ``sbx run``)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.status import Status

from exec_sandbox.images.progress import ProgressEvent, ProgressKind

__all__ = ["RichProgress", "package_event"]


def package_event(step: str, kind: str, detail: str, started: dict[str, float]) -> ProgressEvent:
    """A ``packages=`` progress report (:data:`exec_sandbox.packages.ProgressCallback`) as the
    event this renderer draws; ``started`` remembers when each step began (for its elapsed time)."""
    now = time.monotonic()
    if kind == "start":
        started[step] = now
    return ProgressEvent(step, ProgressKind(kind), detail, now - started.get(step, now))


class RichProgress:
    """Renders build progress: a spinner with elapsed time per running step, a line per finished one."""

    def __init__(self, console: Console, *, log_every_s: float = 30.0) -> None:
        self.console = console
        self._status: Status | None = None
        self._started = time.monotonic()
        # Without a terminal (CI logs) a spinner is invisible: print a heartbeat line instead.
        self._log_every_s = log_every_s
        self._last_log = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind is ProgressKind.START:
            self._stop()
            self._started = time.monotonic()
            if self.console.is_terminal:
                self._status = self.console.status(f"{event.step} {event.detail}".strip())
                self._status.start()
            else:
                self.console.print(f"→ {event.step} {event.detail}".rstrip(), markup=False, highlight=False)
        elif event.kind is ProgressKind.UPDATE:
            text = f"{event.step} [{event.elapsed_s:5.0f}s] {event.detail}"
            if self.console.is_terminal and self._status is not None:
                self._status.update(text)
            elif time.monotonic() - self._last_log >= self._log_every_s:
                self._last_log = time.monotonic()
                self.console.print(f"  … {text}", markup=False, highlight=False)
        elif event.kind is ProgressKind.DONE:
            self._stop()
            self.console.print(f"[green]✓[/] {event.step} ({event.elapsed_s:.1f}s) {event.detail}")
        elif event.kind is ProgressKind.CACHED:
            self._stop()
            self.console.print(f"[blue]●[/] {event.step}: cached ({event.detail})")

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def close(self) -> None:
        self._stop()
