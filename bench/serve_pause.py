"""``sbx serve`` pause to disk, resume, fork and snapshot templates through the E2B SDK, against a fresh
create in the same run (the baseline a caller would otherwise pay to get a sandbox back).

One command::

    .venv/bin/python bench/serve_pause.py [-n 5] [--json PATH]

Each round uses a code-interpreter sandbox with a warm Python context (two VMs) holding a variable:

- ``pause``: ``sbx.pause()`` (both VMs saved to the state dir, then freed);
- ``resume``: ``Sandbox.connect(id)`` up to the first ``run_code`` that sees the variable;
- ``fork``: ``sbx.fork(count=1)`` up to the child's first ``run_code`` that sees it;
- ``from template``: ``Sandbox.create(snapshot_id)`` up to the first ``run_code`` that sees it;
- baseline ``create``: ``Sandbox.create()`` up to its first ``run_code("1")`` (a fresh context VM);

prints medians / p95 (ms), the ratios against the baseline, and the state dir's size per paused
sandbox. The host is shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.percentile import p95
from tests.integration.serve_server import KEY_A, running_server, sdk_env

from exec_sandbox.server.logs import configure_logging


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 1), "p95_ms": round(p95(ordered), 1)}


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class _Clock:
    """Milliseconds since the last ``lap()`` (or creation)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1000, now
        return ms


def _round(i: int, state: Path, samples: dict[str, list[float]]) -> int:
    """One round (see the module docstring); returns the bytes the pause put on disk."""
    from e2b_code_interpreter import Sandbox

    clock = _Clock()
    fresh = Sandbox.create()
    fresh.run_code("1")
    samples["create"].append(clock.lap())
    fresh.kill()

    sbx = Sandbox.create()
    made: list[Any] = [sbx]
    try:
        sbx.run_code(f"value = {i}")
        info = sbx.create_snapshot()
        clock.lap()
        made += sbx.fork(count=1)
        assert made[-1].run_code("value").text == str(i)
        samples["fork"].append(clock.lap())
        made.append(Sandbox.create(info.snapshot_id))
        assert made[-1].run_code("value").text == str(i)
        samples["from template"].append(clock.lap())
        before = _disk_bytes(state / "sandboxes")
        clock.lap()
        sbx.pause()
        samples["pause"].append(clock.lap())
        on_disk = _disk_bytes(state / "sandboxes") - before
        clock.lap()
        back = Sandbox.connect(sbx.sandbox_id)
        assert back.run_code("value").text == str(i)
        samples["resume"].append(clock.lap())
        Sandbox.delete_snapshot(info.snapshot_id)
    finally:
        for s in made:
            s.kill()
    return on_disk


def run(n: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {k: [] for k in ("create", "pause", "resume", "fork", "from template")}
    paused_bytes: list[int] = []
    with (
        tempfile.TemporaryDirectory(prefix="sbx-bench-state-") as state,
        running_server(state_dir=Path(state)) as srv,
        sdk_env(srv.url, KEY_A),
    ):
        for i in range(n):
            paused_bytes.append(_round(i, Path(state), samples))
    base = statistics.median(samples["create"])
    return {
        **{k: _stats(v) for k, v in samples.items()},
        "ratio_to_create": {
            k: round(statistics.median(v) / base, 2) for k, v in samples.items() if k != "create"
        },
        "paused_on_disk_mb": round(statistics.median(paused_bytes) / 1e6, 1),
        "n": n,
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5, help="rounds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    configure_logging("json", "warning")  # as `sbx serve --log-level warning` would
    report = run(args.n)
    for key, value in report.items():
        print(f"{key:16s} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
