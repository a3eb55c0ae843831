"""Hostile guest programs (Python source) shared by the tests/security attacks."""

from __future__ import annotations

__all__ = ["grow_when_read"]


def grow_when_read(path: str, *, initial_mib: int, grow_mib: int) -> str:
    """Session code: write ``initial_mib`` MiB to ``path`` and leave a thread in the session's
    interpreter that appends ``grow_mib`` MiB as soon as someone starts reading the file - i.e.
    after a size check (a stat does not touch atime) and during the download (the first read after
    a write updates atime under the default ``relatime``). A thread of the persistent interpreter,
    not a process, so no per-exec process cleanup stops it; it gives up after 120 s."""
    return f"""
import os, threading, time
_path = {path!r}
with open(_path, "wb") as _f:
    _f.write(b"a" * ({initial_mib} << 20))
_st0 = os.stat(_path)

def _grow():
    end = time.monotonic() + 120
    while time.monotonic() < end and os.stat(_path).st_atime_ns == _st0.st_atime_ns:
        time.sleep(0.002)
    block = b"b" * (1 << 20)
    with open(_path, "ab") as f:
        for _ in range({grow_mib}):
            f.write(block)

threading.Thread(target=_grow, daemon=True).start()
"""
