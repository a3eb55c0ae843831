"""A background process against an exec, in one session, in one run: why exec keeps its own path.

One command::

    .venv/bin/python bench/process_latency.py [-n 40] [--json PATH]

Times, in one ``raw`` session VM (TCG here), ``-n`` times each, interleaved:

- ``exec``: ``session.exec("true")`` (the exec path: one request, one exit);
- ``process``: ``session.start_process(["true"])`` then ``wait()`` (start, started, exit);
- ``process+io``: ``start_process(["cat"], stdin=True)``, send 4 KiB, close stdin, read it back;

and prints medians and p95 (ms) and each one's ratio to ``exec``; then the host RSS growth while a
guest process prints 64 MiB nobody reads (the ring bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.percentile import p95
from tests.support.memory import MIB, RssPeak

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.sandbox.session import Session


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95(ordered), 2),
            "n": len(ordered)}


async def _exec(session: Session) -> None:
    result = await session.exec("true")
    assert result.exit_code == 0


async def _process(session: Session) -> None:
    async with await session.start_process(["true"]) as proc:
        assert (await proc.wait()).exit_code == 0


async def _process_io(session: Session) -> None:
    payload = b"x" * 4096
    async with await session.start_process(["cat"], stdin=True) as proc:
        await proc.send_input(payload)
        await proc.close_stdin()
        got = b"".join([c.data async for c in proc.output()])
        assert got == payload


async def main(n: int) -> dict[str, Any]:
    async with Scheduler(SchedulerConfig()) as scheduler, await scheduler.session(language="raw") as s:
        cases = {"exec": _exec, "process": _process, "process+io": _process_io}
        samples: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():  # warm-up: the guest translates each path once under TCG
            await fn(s)
        for _ in range(n):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                await fn(s)
                samples[name].append((time.perf_counter() - t0) * 1000)
        out: dict[str, Any] = {k: _stats(v) for k, v in samples.items()}
        base = out["exec"]["median_ms"]
        for k in cases:
            out[k]["ratio_to_exec"] = round(out[k]["median_ms"] / base, 2)
        with RssPeak() as mem:
            async with await s.start_process(["head", "-c", str(64 * MIB), "/dev/zero"],
                                             max_output_bytes=128 * MIB) as proc:
                await proc.wait()
        out["unread_64MiB_rss_growth_mib"] = round(mem.growth / MIB, 1)
        return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(main(args.n))
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key:12s} median {value['median_ms']:8.2f} ms  p95 {value['p95_ms']:8.2f} ms  "
                  f"x{value['ratio_to_exec']:.2f} of exec")
        else:
            print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
