"""Host memory of this test process: VmRSS now, and the peak VmRSS during a block.

The peak is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs at the start
of the block), so a transient allocation inside one C call that holds the GIL is seen too; a
sampling thread is the fallback where the reset is not allowed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = ["MIB", "RssPeak", "rss_bytes"]

MIB = 1024 * 1024


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    return _status("VmRSS")


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssPeak:
    """``with RssPeak() as m: ...`` -> ``m.baseline``, ``m.peak``, ``m.growth`` (bytes).

    A thread samples /proc/self/status every ``interval`` seconds (independent of a busy event loop).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        self._hwm = _reset_high_water_mark()
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(), _status("VmHWM") if self._hwm else 0)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __str__(self) -> str:
        return (f"RSS baseline {self.baseline / MIB:.1f} MiB, peak {self.peak / MIB:.1f} MiB "
                f"(+{self.growth / MIB:.1f})")
