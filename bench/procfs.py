"""/proc readings shared by the benchmarks (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_ticks", "own_children", "stat_fields"]


def stat_fields(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 is the state, field 3 in proc(5)).
    The name may hold spaces and parentheses, so the fields resume after the last ')'."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def own_children() -> list[int]:
    """Pids of this process's live (or not yet reaped) children."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if stat_fields(entry.name)[1] == me:
                found.append(int(entry.name))
        except OSError:
            continue
    return found
