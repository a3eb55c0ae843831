"""Density benchmark (issue 5): N idle sandboxes open at once, through the public API.

One command::

    .venv/bin/python bench/density.py [-n 200] [--concurrency 4] [--idle-seconds 10] [--json PATH]

What it does, all through ``Scheduler`` / ``await scheduler.session()`` with the DEFAULT admission
policy (``SchedulerConfig()``; memory snapshots on, so sessions restore from the shared L1 cache):

1. reads the host's MemAvailable, then opens N sessions, ``--concurrency`` at a time (a client
   pool; admission itself queues what does not fit) and times each open and the whole batch;
2. lets them idle, then measures per QEMU process: PSS and RSS (``/proc/PID/smaps_rollup``), a PSS
   breakdown by mapping (``/proc/PID/smaps``: TCG code buffer, heap, guest RAM, QEMU binary,
   libraries, other anonymous memory), and CPU use over ``--idle-seconds``;
3. reads MemAvailable again (host RAM really taken = the drop, per VM);
4. sends every session one ``exec`` (``print(i)``) and checks each answer; measures PSS again;
5. closes everything and verifies no QEMU (or qemu-storage-daemon) child of this process is left.

The only non-default setting is ``session_idle_timeout_seconds`` (1 h instead of 5 min): on a
shared 2-core host, opening 200 sessions can take longer than the default idle timeout, and a
session closed for idleness would not be an open sandbox any more. It is not an admission setting.
The accelerator in use and the host load average (the machine is shared) are printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.host.capacity import read_meminfo
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.sandbox.session import Session
from exec_sandbox.settings import Settings
from smartvm.qemu import choose_accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from percentile import p95
from procfs import cpu_ticks, own_children

__all__ = ["main"]

TARGET_PSS_MIB = 30.0
TARGET_CPU_PERCENT = 0.5
TARGET_VMS = 200
_VMA = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def mem_available_mib() -> float:
    return round(read_meminfo().available_bytes / 2**20, 1)


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 2),
        "p95": round(p95(ordered), 2),
        "min": round(ordered[0], 2),
        "max": round(ordered[-1], 2),
        "n": len(ordered),
    }


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:", "Private_Dirty:", "Private_Clean:"):
            out[parts[0][:-1].lower()] = int(parts[1])
    return out


def _category(name: str, perms: str) -> str:
    if not name and perms == "rwxp":
        return "tcg_code_buffer"
    if name == "[heap]":
        return "heap"
    if name.startswith("["):
        return "stacks_and_kernel_maps"
    if "/dev/shm/" in name or name.endswith("/memory") or name.endswith(".ram"):
        return "guest_ram"
    if "qemu-system" in name:
        return "qemu_binary"
    if ".so" in name:
        return "libraries"
    if name.startswith("/"):
        return "other_files"
    return "other_anonymous"


def pss_breakdown_kib(pid: int) -> Counter[str]:
    """PSS per kind of mapping, from ``/proc/PID/smaps``."""
    out: Counter[str] = Counter()
    category = "other_anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if _VMA.match(line):
            parts = line.split(maxsplit=5)
            category = _category(parts[5].strip() if len(parts) > 5 else "", parts[1])
        elif line.startswith("Pss:"):
            out[category] += int(line.split()[1])
    return out


def vm_children() -> list[tuple[int, str]]:
    """QEMU / qemu-storage-daemon processes whose parent is this process."""
    found = []
    for pid in own_children():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if "qemu" in Path(cmd).name:
            found.append((pid, Path(cmd).name))
    return found


def memory_of(pids: list[int]) -> dict[str, Any]:
    rollups = [smaps_rollup_kib(pid) for pid in pids]
    breakdowns = [pss_breakdown_kib(pid) for pid in pids]
    kinds = sorted({k for b in breakdowns for k in b})
    return {
        "pss_mib": stats([r["pss"] / 1024 for r in rollups]),
        "rss_mib": stats([r["rss"] / 1024 for r in rollups]),
        "private_mib": stats([(r["private_dirty"] + r["private_clean"]) / 1024 for r in rollups]),
        "pss_breakdown_median_mib": {
            k: round(statistics.median(b[k] / 1024 for b in breakdowns), 2)
            for k in sorted(kinds, key=lambda k: -statistics.median(b[k] for b in breakdowns))
        },
    }


async def open_sessions(sched: Scheduler, count: int, concurrency: int) -> tuple[list[Session], list[float]]:
    sessions: list[Session] = []
    times: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def client() -> None:
        while not queue.empty():
            queue.get_nowait()
            t = time.perf_counter()
            session = await sched.session()
            times.append((time.perf_counter() - t) * 1000)
            sessions.append(session)

    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*clients)
    except BaseException:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        raise
    return sessions, times


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(force_emulation=True) if args.force_emulation else Settings()
    accel = choose_accelerator("tcg" if settings.force_emulation else None)
    config = SchedulerConfig(session_idle_timeout_seconds=3600.0)
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, Any] = {"vms_requested": args.n}
    started, load_start = time.time(), loadavg()
    async with Scheduler(config, settings=settings) as sched:
        await sched.prewarm(["python"], wait=False)  # image lookup (and build on first use) untimed
        # One session first so a changed image's snapshot is saved before the timed batch.
        warm = await sched.session()
        await warm.close()
        await asyncio.sleep(1.0)
        before = mem_available_mib()
        t = time.perf_counter()
        sessions, open_ms = await open_sessions(sched, args.n, args.concurrency)
        total_open_s = time.perf_counter() - t
        try:
            out["open"] = {
                "total_s": round(total_open_s, 2),
                "per_session_ms": stats(open_ms),
                "concurrency": args.concurrency,
                "restored_from_snapshot": sum(s.restored_from_snapshot for s in sessions),
            }
            adm = sched.admission.stats()
            out["admission"] = {
                "active": adm.active,
                "busy": adm.busy,
                "memory_budget_mb": adm.memory_budget_mb,
                "memory_committed_mb": adm.memory_in_use_mb,
                "cpu_budget": adm.cpu_budget,
                "cpu_in_use": adm.cpu_in_use,
                "live_available_mb": adm.live_available_mb,
                "live_guard_waits_total": adm.live_guard_waits_total,
                "max_idle_vms_default_size": sched.admission.max_idle_vms(config.default_memory_mb),
            }
            pids = [s.vm.machine.pid for s in sessions if s.vm.machine.pid is not None]
            await asyncio.sleep(args.settle_seconds)  # let the guests go idle
            ticks0 = {pid: cpu_ticks(pid) for pid in pids}
            await asyncio.sleep(args.idle_seconds)
            ticks1 = {pid: cpu_ticks(pid) for pid in pids}
            out["idle"] = {
                "vms": len(pids),
                **memory_of(pids),
                "cpu_percent_of_a_core": stats(
                    [(ticks1[p] - ticks0[p]) / hz / args.idle_seconds * 100 for p in pids]
                ),
                "idle_seconds": args.idle_seconds,
            }
            after = mem_available_mib()
            out["host"] = {
                "mem_available_before_mib": before,
                "mem_available_with_vms_mib": after,
                "taken_per_vm_mib": round((before - after) / max(1, len(pids)), 2),
            }
            answers: list[float] = []
            wrong = 0
            for i, session in enumerate(sessions):
                t = time.perf_counter()
                result = await session.exec(f"print({i})")
                answers.append((time.perf_counter() - t) * 1000)
                wrong += result.stdout != f"{i}\n" or result.exit_code != 0
            await asyncio.sleep(args.settle_seconds)
            out["after_one_exec"] = {
                "answered": len(answers) - wrong,
                "wrong": wrong,
                "exec_ms": stats(answers),
                **memory_of(pids),
                "mem_available_mib": mem_available_mib(),
            }
        finally:
            t = time.perf_counter()
            await asyncio.gather(*(s.close() for s in sessions))
            out["close_s"] = round(time.perf_counter() - t, 2)
    leftovers = vm_children()
    out["leftover_processes"] = [f"{name} pid {pid}" for pid, name in leftovers]
    out["mem_available_after_close_mib"] = mem_available_mib()
    out["targets"] = {
        "vms_open": {"target": TARGET_VMS, "measured": out["idle"]["vms"]},
        "idle_pss_median_mib": {"target": TARGET_PSS_MIB, "measured": out["idle"]["pss_mib"]["median"]},
        "idle_cpu_percent_median": {
            "target": TARGET_CPU_PERCENT,
            "measured": out["idle"]["cpu_percent_of_a_core"]["median"],
        },
    }
    out["targets"]["vms_open"]["met"] = out["idle"]["vms"] >= TARGET_VMS
    for key in ("idle_pss_median_mib", "idle_cpu_percent_median"):
        out["targets"][key]["met"] = out["targets"][key]["measured"] <= out["targets"][key]["target"]
    out["machine"] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mem_total_mib": round(read_meminfo().total_bytes / 2**20),
        "python": sys.version.split()[0],
        "accelerator": f"{accel.accel} ({accel.reason})",
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "duration_s": round(time.time() - started, 1),
        "config": "SchedulerConfig(session_idle_timeout_seconds=3600) - admission defaults",
    }
    return out


def report(r: dict[str, Any]) -> str:
    idle, after, host, adm = r["idle"], r["after_one_exec"], r["host"], r["admission"]
    m = r["machine"]

    def line(name: str, s: dict[str, float], unit: str) -> str:
        return (
            f"  {name:<34} median {s['median']:8.2f} {unit:<4} p95 {s['p95']:8.2f} {unit:<4} "
            f"max {s['max']:8.2f}"
        )

    lines = [
        f"density: {idle['vms']} idle sessions (requested {r['vms_requested']}), "
        f"accelerator {m['accelerator']}",
        f"  host: {m['cpus']} CPUs, {m['mem_total_mib']} MiB RAM, load {m['loadavg_start']} -> "
        f"{m['loadavg_end']}, {m['duration_s']} s",
        f"  opened in {r['open']['total_s']} s with {r['open']['concurrency']} clients; "
        f"{r['open']['restored_from_snapshot']} restored from the L1 snapshot",
        line("open one session", r["open"]["per_session_ms"], "ms"),
        f"  admission (defaults): {adm['active']} VMs held, {adm['busy']} busy, committed "
        f"{adm['memory_committed_mb']} of {adm['memory_budget_mb']} MiB, CPU {adm['cpu_in_use']} of "
        f"{adm['cpu_budget']:g}, host headroom at last decision {adm['live_available_mb']} MiB, "
        f"live-guard waits {adm['live_guard_waits_total']}",
        "  idle (opened, nothing run):",
        line("PSS per QEMU", idle["pss_mib"], "MiB"),
        line("RSS per QEMU", idle["rss_mib"], "MiB"),
        line("private (USS) per QEMU", idle["private_mib"], "MiB"),
        line(f"CPU over {idle['idle_seconds']} s", idle["cpu_percent_of_a_core"], "%"),
        "    PSS by mapping (median MiB): "
        + ", ".join(f"{k} {v}" for k, v in idle["pss_breakdown_median_mib"].items() if v >= 0.05),
        f"  host MemAvailable: {host['mem_available_before_mib']} MiB before -> "
        f"{host['mem_available_with_vms_mib']} MiB with the VMs = {host['taken_per_vm_mib']} MiB per VM",
        f"  every session answered one exec: {after['answered']} of {idle['vms']} ({after['wrong']} wrong)",
        line("exec print(i)", after["exec_ms"], "ms"),
        line("PSS per QEMU after that exec", after["pss_mib"], "MiB"),
        "    PSS by mapping (median MiB): "
        + ", ".join(f"{k} {v}" for k, v in after["pss_breakdown_median_mib"].items() if v >= 0.05),
        f"  closed in {r['close_s']} s; leftover QEMU processes: {r['leftover_processes'] or 'none'}; "
        f"MemAvailable after close {r['mem_available_after_close_mib']} MiB",
        "  targets:",
    ]
    for key, t in r["targets"].items():
        lines.append(
            f"    {key:<28} target {t['target']:<6} measured {t['measured']:<8} "
            f"{'MET' if t['met'] else 'NOT MET'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=TARGET_VMS, help="idle sessions to open (default 200)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="sessions being opened at once (default 4)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="CPU sampling window (default 10)")
    parser.add_argument("--settle-seconds", type=float, default=3.0, help="wait before measuring (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--force-emulation", action="store_true", help="force TCG (default: automatic choice)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.idle_seconds <= 0 or args.settle_seconds < 0:
        parser.error("-n and --concurrency must be >= 1, --idle-seconds > 0, --settle-seconds >= 0")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if not result["leftover_processes"] and result["after_one_exec"]["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
