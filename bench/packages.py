"""Benchmark of ``packages=`` (issue 14): what a package set costs the first time and after.

One command::

    .venv/bin/python bench/packages.py [--package six] [--runs 10] [--cold-runs 3] [--json PATH]

Everything goes through ``Scheduler.run`` (what a user calls), wall clock around the call,
medians and p95, each with fresh private caches (nothing from earlier runs or other users):

* ``cold``      ``run(code, packages=[...])`` on empty L2 and L1 caches: host resolve (pip/npm with
                this host's configuration), download + install into a host tree, the package disk,
                the builder VM, then a cold boot from the new layer and its L1 snapshot.
* ``L2+L1``     ``run("print(1)", packages=[...])`` once the set is cached: the VM is restored from
                the layer's own L1 snapshot (the resolution is remembered by the Scheduler, see
                ``PackageLayers.resolve_ttl_s``). The same code as the baseline, so the ratio is
                what packages cost the start of a sandbox, not what importing them costs.
* ``bare L1``   ``run("print(1)")`` without packages, restored from the base image's L1 snapshot -
                the baseline, interleaved with the L2+L1 runs in the same process. Ratios use
                medians.

The package set comes from this host's own pip configuration (``six`` by default); a host that
cannot reach its index cannot run this benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from percentile import p95

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import RunResult, Scheduler
from exec_sandbox.settings import Settings

__all__ = ["main"]


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered), "p95_ms": p95(ordered), "n": len(ordered)}


async def timed(call: Callable[[], Awaitable[RunResult]], expect: str) -> tuple[float, RunResult]:
    started = time.perf_counter()
    result = await call()
    elapsed = (time.perf_counter() - started) * 1000.0
    if result.exit_code != 0 or not result.stdout.strip():
        raise RuntimeError(f"{expect}: unexpected result {result.stdout!r} / {result.stderr[-500:]!r}")
    return elapsed, result


def scheduler(root: Path) -> Scheduler:
    config = SchedulerConfig(default_timeout_seconds=120, warm_pool_size=0)
    return Scheduler(
        config, settings=Settings(), snapshot_dir=root / "snapshots", layer_dir=root / "layers"
    )


async def bench(packages: list[str], code: str, runs: int, cold_runs: int) -> dict[str, Any]:
    cold: list[float] = []
    for _ in range(cold_runs):
        with tempfile.TemporaryDirectory(prefix="sbx-bench-pkg-") as tmp:
            async with scheduler(Path(tmp)) as s:
                ms, result = await timed(lambda: s.run(code, packages=packages), "cold")
                assert result.packages_cache_hit is False and not result.restored_from_snapshot
                cold.append(ms)
                assert s.snapshot_cache is not None
                await s.snapshot_cache.wait_saved()
    with tempfile.TemporaryDirectory(prefix="sbx-bench-pkg-") as tmp:
        async with scheduler(Path(tmp)) as s:
            assert s.snapshot_cache is not None
            _, first = await timed(lambda: s.run(code, packages=packages), "prime L2")
            await timed(lambda: s.run("print(1)"), "prime bare L1")
            await s.snapshot_cache.wait_saved()
            warm: list[float] = []
            bare: list[float] = []
            for _ in range(runs):  # interleaved: both see the same host load
                ms, r = await timed(lambda: s.run("print(1)", packages=packages), "L2+L1")
                assert r.packages_cache_hit and r.restored_from_snapshot, "expected an L2 + L1 hit"
                warm.append(ms)
                ms, r = await timed(lambda: s.run("print(1)"), "bare L1")
                assert r.restored_from_snapshot
                bare.append(ms)
    out = {
        "packages": packages,
        "lock": first.packages.versions() if first.packages else {},
        "accelerator": first.accelerator,
        "loadavg": os.getloadavg(),
        "cold": stats(cold),
        "l2_l1": stats(warm),
        "bare_l1": stats(bare),
    }
    out["ratio_l2_l1_vs_bare_l1"] = out["l2_l1"]["median_ms"] / out["bare_l1"]["median_ms"]
    out["ratio_cold_vs_bare_l1"] = out["cold"]["median_ms"] / out["bare_l1"]["median_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--package", action="append", help="requirement (repeatable; default: six)")
    parser.add_argument("--code", default=None, help="Python code to run (default: import the packages)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    packages = args.package or ["six"]
    names = [re.split(r"[=<>!~;\[ ]", p, maxsplit=1)[0] for p in packages]
    code = args.code or f"import {', '.join(names)}; print(1)"
    result = asyncio.run(bench(packages, code, args.runs, args.cold_runs))
    load = result["loadavg"][0]
    print(f"packages {packages} -> {result['lock']} ({result['accelerator']}, load {load:.2f})")
    for name in ("cold", "l2_l1", "bare_l1"):
        s = result[name]
        print(f"  {name:8s} median {s['median_ms']:8.1f} ms   p95 {s['p95_ms']:8.1f} ms   (n={s['n']})")
    print(f"  L2+L1 / bare L1 = {result['ratio_l2_l1_vs_bare_l1']:.2f}x   cold / bare L1 = "
          f"{result['ratio_cold_vs_bare_l1']:.1f}x (medians)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
