"""The p95 every benchmark here reports, computed one way (nearest rank)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["p95"]


def p95(ordered: Sequence[float]) -> float:
    """Nearest-rank 95th percentile of ``ordered`` (sorted ascending, not empty)."""
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
