"""/proc readings for tests (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["thread_nices"]


def thread_nices(pid: int) -> list[int]:
    """The nice value of every thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    values = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        values.append(int(raw[raw.rindex(")") + 2 :].split()[16]))
    return values
