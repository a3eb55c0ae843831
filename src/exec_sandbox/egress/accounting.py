"""Per-sandbox egress accounting: the bounded egress log, byte caps and a token-bucket rate limit."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ByteCapExceeded", "EgressLog", "EgressLogEntry", "EgressStats", "TokenBucket"]

Mode = Literal["http", "connect", "sni", "host"]


class EgressLogEntry(BaseModel):
    """One connection (or refused attempt) through the proxy."""

    model_config = ConfigDict(frozen=True)

    time: float  # unix time when the connection was accepted
    name: str  # the host name (or IP literal) asked for
    port: int
    mode: Mode  # http = absolute-URI proxy request, connect = CONNECT, sni / host = transparent
    allowed: bool
    rule: str | None = None  # machine-readable refusal rule (e.g. "not_allowlisted")
    reason: str | None = None  # the sentence the client was told
    intercepted: bool = False  # TLS terminated to inject a secret
    bytes_in: int = 0  # upstream -> guest
    bytes_out: int = 0  # guest -> upstream
    duration_s: float = 0.0


class EgressStats(BaseModel):
    """Counters for metrics."""

    connections_total: int = 0
    refused_total: int = 0
    refused_by_rule: dict[str, int] = Field(default_factory=dict)  # e.g. {"not_allowlisted": 3}
    active_connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class EgressLog:
    """A ring buffer of :class:`EgressLogEntry` (oldest dropped past ``maxlen``)."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._entries: deque[EgressLogEntry] = deque(maxlen=maxlen)
        self.dropped = 0

    def append(self, entry: EgressLogEntry) -> None:
        if len(self._entries) == self._entries.maxlen:
            self.dropped += 1
        self._entries.append(entry)

    def entries(self, *, allowed: bool | None = None, name: str | None = None,
                since: float | None = None) -> list[EgressLogEntry]:
        """Entries, oldest first, filtered by outcome / name / time."""
        return [e for e in self._entries
                if (allowed is None or e.allowed == allowed)
                and (name is None or e.name == name)
                and (since is None or e.time >= since)]

    def __len__(self) -> int:
        return len(self._entries)


class ByteCapExceeded(Exception):
    """A per-sandbox byte cap was reached while relaying."""

    def __init__(self, direction: str, limit: int) -> None:
        super().__init__(f"max_bytes_{direction} ({limit} bytes) reached")
        self.direction, self.limit = direction, limit


class TokenBucket:
    """``rate`` bytes/s with a burst of ``burst`` bytes; :meth:`take` sleeps until allowed."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate, 64 * 1024))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                need = min(float(n), self.burst)
                if self._tokens >= need:
                    self._tokens -= need
                    return
                await asyncio.sleep((need - self._tokens) / self.rate)
