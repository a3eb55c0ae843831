"""``sbx serve`` under load: N idle sandboxes held open while C clients issue commands through the
async E2B SDK; counts failures by kind and reports request latency percentiles.

One command::

    .venv/bin/python bench/serve_load.py [--sandboxes 20] [--clients 10] [--commands 10] [--json PATH]

The server runs in this process (uvicorn in a thread, 127.0.0.1); ``--sandboxes`` are created
``--create-concurrency`` at a time (a refusal such as 429/503 is counted, not retried), then every
client runs ``--commands`` ``echo`` commands on sandboxes picked round-robin. Host memory is read
before, with all sandboxes idle, and after the commands: MemAvailable and the PSS of every guest
QEMU (this process's children); and the CPU time per command of the guests and of this process.
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

from bench.density import mem_available_mib, memory_of, vm_children
from bench.percentile import p95
from bench.procfs import cpu_ticks
from tests.integration.serve_server import KEY_A, running_server, sdk_env

from exec_sandbox.server.logs import configure_logging


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    from e2b import AsyncSandbox

    failures: Counter[str] = Counter()
    mem_before = mem_available_mib()
    gate = asyncio.Semaphore(args.create_concurrency)
    create_ms: list[float] = []

    async def create() -> Any:
        async with gate:
            t = time.perf_counter()
            try:
                box = await AsyncSandbox.create(timeout=3600)
            except Exception as exc:
                failures[f"create: {_kind(exc)}"] += 1
                return None
            create_ms.append((time.perf_counter() - t) * 1000)
            return box

    t0 = time.perf_counter()
    boxes = [b for b in await asyncio.gather(*(create() for _ in range(args.sandboxes))) if b is not None]
    created_s = time.perf_counter() - t0
    latencies: list[float] = []
    await asyncio.sleep(args.settle_seconds)  # idle: what the sandboxes hold at rest
    idle = _host_memory(mem_before)

    async def client(i: int) -> None:
        for j in range(args.commands):
            box = boxes[(i * args.commands + j) % len(boxes)]
            t = time.perf_counter()
            try:
                r = await box.commands.run(f"echo {i}-{j}")
                if r.stdout != f"{i}-{j}\n":
                    failures["wrong output"] += 1
            except Exception as exc:
                failures[f"command: {_kind(exc)}"] += 1
                continue
            latencies.append((time.perf_counter() - t) * 1000)

    guests = [pid for pid, name in vm_children() if name.startswith("qemu-system")]
    cpu0 = _cpu_s(guests)
    t1 = time.perf_counter()
    if boxes:
        await asyncio.gather(*(client(i) for i in range(args.clients)))
    commands_s = time.perf_counter() - t1
    cpu1 = _cpu_s(guests)
    per_command = {
        k: round((cpu1[k] - cpu0[k]) * 1000 / max(len(latencies), 1), 1) for k in ("guests", "this_process")
    }
    busy = _host_memory(mem_before)
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
        "cpu_ms_per_command": per_command,
        "host_mem_idle": idle,
        "host_mem_after_commands": busy,
        "loadavg": os.getloadavg(),
    }


def _kind(exc: BaseException) -> str:
    """A failure's kind: the exception type and, for HTTP refusals, the status the message names."""
    text = str(exc)
    code = next((c for c in ("429", "502", "503", "500", "504") if c in text[:80]), None)
    return f"{type(exc).__name__}{f' {code}' if code else ''}"


def _cpu_s(guests: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the guests' QEMUs and by this process (server + SDK clients)."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in guests:
        try:
            total += cpu_ticks(pid)
        except OSError:
            pass
    me = os.times()
    return {"guests": total / hz, "this_process": me.user + me.system}


def _host_memory(mem_before: float) -> dict[str, Any]:
    guests = [pid for pid, name in vm_children() if name.startswith("qemu-system")]
    now = mem_available_mib()
    out: dict[str, Any] = {
        "guests": len(guests),
        "mem_available_mib": now,
        "mem_taken_mib": round(mem_before - now, 1),
        "mem_taken_per_guest_mib": round((mem_before - now) / len(guests), 1) if guests else None,
    }
    if guests:
        mem = memory_of(guests)
        out["pss_mib_median"] = mem["pss_mib"]["median"]
        out["pss_mib_p95"] = mem["pss_mib"]["p95"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sandboxes", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--commands", type=int, default=10)
    parser.add_argument("--create-concurrency", type=int, default=4)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # Logging as `sbx serve --log-format json --log-level warning` sets it up (else the MCP SDK's
    # rich console handler would render every request's access line, in this same process).
    configure_logging("json", "warning")
    with running_server(max_sandboxes_per_key=max(args.sandboxes, 1)) as srv, sdk_env(srv.url, KEY_A):
        report = asyncio.run(scenario(args))
    for key, value in report.items():
        print(f"{key:20s} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
