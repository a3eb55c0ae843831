"""``sbx serve`` overhead: the same operation through the E2B SDK (HTTP, Connect RPC) and through the
Python API, in one run, with the ratio.

One command::

    .venv/bin/python bench/serve_latency.py [-n 50] [--clients 4] [--json PATH]

1. starts ``sbx serve`` (uvicorn) on 127.0.0.1 in a thread, creates one sandbox per client through
   the unmodified ``e2b`` SDK and times ``sandbox.commands.run("true")`` and
   ``run_code("1")`` (``e2b-code-interpreter``) ``-n`` times per client, clients in parallel;
2. in the same process, opens ``raw`` / ``python`` sessions with ``Scheduler.session`` and times
   ``session.exec("true")`` / ``exec("1")`` the same way;
3. prints medians and p95 (ms) and the SDK/API ratio; also the create -> kill latency of a sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.percentile import p95
from tests.integration.serve_server import KEY_A, running_server, sdk_env

from exec_sandbox.server.logs import configure_logging


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(p95(ordered), 2),
        "n": len(ordered),
    }


def _parallel(clients: int, work: Callable[[int], list[float]]) -> list[float]:
    results: list[list[float]] = [[] for _ in range(clients)]

    def one(i: int) -> None:
        results[i] = work(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for r in results for x in r]


def bench_sdk(n: int, clients: int) -> dict[str, Any]:
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox

    out: dict[str, Any] = {}
    with running_server() as srv, sdk_env(srv.url, KEY_A):
        t0 = time.perf_counter()
        Sandbox.create().kill()
        out["create_kill_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        boxes = [CodeSandbox.create() for _ in range(clients)]
        try:
            for b in boxes:  # warm: the python context boots on its first cell
                b.run_code("1")

            def commands(i: int) -> list[float]:
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    boxes[i].commands.run("true")
                    times.append((time.perf_counter() - t) * 1000)
                return times

            def cells(i: int) -> list[float]:
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    boxes[i].run_code("1")
                    times.append((time.perf_counter() - t) * 1000)
                return times

            out["commands.run"] = _stats(_parallel(clients, commands))
            out["run_code"] = _stats(_parallel(clients, cells))
        finally:
            for b in boxes:
                b.kill()
    return out


async def bench_api(n: int, clients: int) -> dict[str, Any]:
    from exec_sandbox import Scheduler

    async def loop(session: Any, code: str) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await session.exec(code)
            times.append((time.perf_counter() - t) * 1000)
        return times

    out: dict[str, Any] = {}
    async with Scheduler() as scheduler:
        for language, code, name in (
            ("raw", "true", "session.exec(raw)"),
            ("python", "1", "session.exec(py)"),
        ):
            sessions = [await scheduler.session(language) for _ in range(clients)]
            try:
                runs = await asyncio.gather(*(loop(s, code) for s in sessions))
                out[name] = _stats([x for r in runs for x in r])
            finally:
                for s in sessions:
                    await s.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50, help="operations per client")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # Logging as `sbx serve --log-format json --log-level warning` sets it up (else the MCP SDK's
    # rich console handler would render every request's access line, in this same process).
    configure_logging("json", "warning")
    sdk = bench_sdk(args.n, args.clients)
    api = asyncio.run(bench_api(args.n, args.clients))
    ratios = {
        "commands.run / session.exec(raw)": round(
            sdk["commands.run"]["median_ms"] / api["session.exec(raw)"]["median_ms"], 2
        ),
        "run_code / session.exec(py)": round(
            sdk["run_code"]["median_ms"] / api["session.exec(py)"]["median_ms"], 2
        ),
    }
    report = {
        "sdk": sdk,
        "api": api,
        "median_ratio": ratios,
        "clients": args.clients,
        "loadavg": os.getloadavg(),
    }
    for name, st in [*sdk.items(), *api.items()]:
        if isinstance(st, dict):
            print(f"{name:22s} median {st['median_ms']:8.2f} ms   p95 {st['p95_ms']:8.2f} ms   (n={st['n']})")
    print(f"{'create + kill':22s} {sdk['create_kill_ms']:8.1f} ms")
    for name, r in ratios.items():
        print(f"ratio {name}: {r}x")
    print(f"load average: {report['loadavg']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
