"""``sbx serve`` under load: N idle sandboxes held open while C clients issue commands through the
async E2B SDK; counts failures by kind and reports request latency percentiles.

One command::

    .venv/bin/python bench/serve_load.py [--sandboxes 20] [--clients 10] [--commands 10] [--json PATH]

The server runs in this process (uvicorn in a thread, 127.0.0.1); ``--sandboxes`` are created
``--create-concurrency`` at a time (a refusal such as 429/503 is counted, not retried), then every
client runs ``--commands`` ``echo`` commands on sandboxes picked round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench.percentile import p95
from tests.integration.serve_server import KEY_A, running_server, sdk_env


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    from e2b import AsyncSandbox

    failures: Counter[str] = Counter()
    gate = asyncio.Semaphore(args.create_concurrency)
    create_ms: list[float] = []

    async def create() -> Any:
        async with gate:
            t = time.perf_counter()
            try:
                box = await AsyncSandbox.create(timeout=3600)
            except Exception as exc:
                failures[f"create: {type(exc).__name__}"] += 1
                return None
            create_ms.append((time.perf_counter() - t) * 1000)
            return box

    t0 = time.perf_counter()
    boxes = [b for b in await asyncio.gather(*(create() for _ in range(args.sandboxes))) if b is not None]
    created_s = time.perf_counter() - t0
    latencies: list[float] = []

    async def client(i: int) -> None:
        for j in range(args.commands):
            box = boxes[(i * args.commands + j) % len(boxes)]
            t = time.perf_counter()
            try:
                r = await box.commands.run(f"echo {i}-{j}")
                if r.stdout != f"{i}-{j}\n":
                    failures["wrong output"] += 1
            except Exception as exc:
                failures[f"command: {type(exc).__name__}"] += 1
                continue
            latencies.append((time.perf_counter() - t) * 1000)

    t1 = time.perf_counter()
    if boxes:
        await asyncio.gather(*(client(i) for i in range(args.clients)))
    commands_s = time.perf_counter() - t1
    await asyncio.gather(*(b.kill() for b in boxes))
    ordered = sorted(latencies)
    return {
        "sandboxes_created": len(boxes),
        "create_wall_s": round(created_s, 2),
        "create_median_ms": round(statistics.median(create_ms), 1) if create_ms else None,
        "commands_ok": len(latencies),
        "commands_per_s": round(len(latencies) / commands_s, 1) if commands_s else None,
        "command_median_ms": round(statistics.median(ordered), 1) if ordered else None,
        "command_p95_ms": round(p95(ordered), 1) if ordered else None,
        "failures": dict(failures),
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sandboxes", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--commands", type=int, default=10)
    parser.add_argument("--create-concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with running_server(max_sandboxes_per_key=max(args.sandboxes, 1)) as srv, sdk_env(srv.url, KEY_A):
        report = asyncio.run(scenario(args))
    for key, value in report.items():
        print(f"{key:20s} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
