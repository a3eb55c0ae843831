"""Progress events emitted while images build; the CLI renders them, library users may log them."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ProgressCallback", "ProgressEvent", "ProgressKind", "StepTimer", "log_progress"]

logger = logging.getLogger("exec_sandbox.images")


class ProgressKind(enum.StrEnum):
    START = "start"
    UPDATE = "update"  # a long step is alive: ``detail`` says how far (e.g. lines of compiler output)
    DONE = "done"
    CACHED = "cached"


@dataclass(frozen=True)
class ProgressEvent:
    step: str
    kind: ProgressKind
    detail: str = ""
    elapsed_s: float = 0.0


ProgressCallback = Callable[[ProgressEvent], None]


def log_progress(event: ProgressEvent) -> None:
    """Default callback: one log line per started/finished step."""
    if event.kind is ProgressKind.UPDATE:
        return
    logger.info("image build: %s %s %s (%.1fs)", event.step, event.kind.value, event.detail, event.elapsed_s)


@dataclass
class StepTimer:
    """Emits START on creation via :meth:`start` and DONE with the elapsed time via :meth:`done`."""

    callback: ProgressCallback
    step: str
    started: float = field(default_factory=time.monotonic)

    def start(self, detail: str = "") -> StepTimer:
        self.started = time.monotonic()
        self.callback(ProgressEvent(self.step, ProgressKind.START, detail))
        return self

    def update(self, detail: str) -> None:
        self.callback(ProgressEvent(self.step, ProgressKind.UPDATE, detail, time.monotonic() - self.started))

    def done(self, detail: str = "") -> float:
        elapsed = time.monotonic() - self.started
        self.callback(ProgressEvent(self.step, ProgressKind.DONE, detail, elapsed))
        return elapsed
