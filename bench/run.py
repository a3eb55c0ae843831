"""Speed benchmark of the public API (issue 5), beside baselines measured in the same process.

One command::

    .venv/bin/python bench/run.py [--quick] [--json PATH]

Everything goes through ``Scheduler`` / ``Session`` (what a user calls), wall clock with
``time.perf_counter`` around the call, medians and p95:

* ``cold run``      ``Scheduler.run("print(1)")`` with memory snapshots and the warm pool off:
                    overlay + QEMU + kernel + init + agent + interpreter start + run + result.
* ``L1 run``        the same with ``enable_memory_snapshots`` (a fresh, private cache: the first run
                    cold-boots and saves the snapshot, reported apart; the timed runs restore).
                    Also ``run("console.log(1)", language="javascript")``, beside Python's.
* ``warm-pool run`` ``warm_pool_size=1``; before each timed run the pool is refilled (untimed), so
                    every timed run is a pool hit (counted and reported).
* ``session exec``  ``session.exec("print(1)")`` in one open session (warm REPL).
* ``throughput``    C concurrent clients each calling ``run("print(1)")`` until N runs are done
                    (snapshots + warm pool of C); runs/s = N / wall time, plus latency under load.
* ``idle VMs``      N sessions (restored VMs) open and idle: PSS and RSS of each QEMU process
                    (``/proc/PID/smaps_rollup``) and its CPU use over a few idle seconds.

Baselines from the same process: an unsandboxed ``python3 -c 'print(1)'`` subprocess and a plain
QEMU boot of Debian's stock cloud kernel to userspace (``bench/boot.py``). Ratios use medians. The
accelerator in use and the host load average (the machine is shared) are printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import bench_plain_qemu, bench_python_subprocess, summary
from percentile import p95
from procfs import cpu_ticks, own_children

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import RunResult, Scheduler
from exec_sandbox.settings import Settings
from smartvm.qemu import choose_accelerator

__all__ = ["main"]

CODE = "print(1)"
TARGETS = {  # issue 5's targets (medians), for the comparison table
    "cold_run_ms": 1200.0,
    "l1_run_ms": 100.0,
    "warm_pool_run_ms": 5.0,
    "throughput_runs_per_s": 15.0,
    "idle_vm_pss_mib": 30.0,
    "idle_vm_cpu_percent": 0.5,
}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def check(result: RunResult) -> RunResult:
    if result.exit_code != 0 or result.stdout != "1\n":
        raise RuntimeError(f"unexpected result: {result.stdout!r} / {result.stderr!r}")
    return result


async def timed(call: Callable[[], Awaitable[RunResult]]) -> tuple[float, RunResult]:
    t = time.perf_counter()
    result = await call()
    return (time.perf_counter() - t) * 1000, check(result)


def new_scheduler(settings: Settings, snapshot_dir: Path, **config: Any) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), settings=settings, snapshot_dir=snapshot_dir)


# --------------------------------------------------------------------------- sandbox paths


async def bench_cold(settings: Settings, snapshot_dir: Path, runs: int) -> dict[str, Any]:
    times, boots = [], []
    accel = None
    async with new_scheduler(settings, snapshot_dir, enable_memory_snapshots=False) as sched:
        for _ in range(runs):
            ms, r = await timed(lambda: sched.run(CODE))
            assert not r.restored_from_snapshot and not r.warm_pool_hit
            times.append(ms)
            boots.append(r.timing.boot_ms)
            accel = r.accelerator
    return {"run": summary(times), "boot_phase": summary(boots), "accelerator": accel}


async def bench_l1(
    settings: Settings, snapshot_dir: Path, runs: int, language: str = "python", code: str = CODE
) -> dict[str, Any]:
    times, restores = [], []
    async with new_scheduler(settings, snapshot_dir) as sched:
        cache = sched.snapshot_cache
        assert cache is not None
        first_ms, first = await timed(lambda: sched.run(code, language=language))
        await cache.wait_saved()
        restored = 0
        for _ in range(runs):
            ms, r = await timed(lambda: sched.run(code, language=language))
            restored += r.restored_from_snapshot
            times.append(ms)
            restores.append(r.timing.restore_ms or 0.0)
    return {
        "first_run_cold_boot_and_save_ms": round(first_ms, 1),
        "first_run_restored": first.restored_from_snapshot,
        "run": summary(times),
        "restore_phase": summary(restores),
        "restored": restored,
        "runs": runs,
    }


async def bench_warm_pool(settings: Settings, snapshot_dir: Path, runs: int) -> dict[str, Any]:
    times, execs = [], []
    hits = 0
    async with new_scheduler(settings, snapshot_dir, warm_pool_size=1) as sched:
        for _ in range(runs):
            await sched.prewarm(["python"], timeout_seconds=300)
            await asyncio.sleep(0.2)  # let the refill's own work (snapshot bookkeeping) settle
            ms, r = await timed(lambda: sched.run(CODE))
            hits += r.warm_pool_hit
            times.append(ms)
            execs.append(r.timing.execute_ms)
    return {"run": summary(times), "execute_phase": summary(execs), "hits": hits, "runs": runs}


async def bench_session(settings: Settings, snapshot_dir: Path, runs: int) -> dict[str, Any]:
    times = []
    async with new_scheduler(settings, snapshot_dir) as sched, await sched.session() as s:
        await s.exec("print(0)")
        for _ in range(runs):
            t = time.perf_counter()
            r = await s.exec(CODE)
            times.append((time.perf_counter() - t) * 1000)
            if r.stdout != "1\n":
                raise RuntimeError(f"unexpected session output {r.stdout!r} / {r.stderr!r}")
    return {"exec": summary(times)}


def _child_cpu_s() -> float:
    """CPU seconds of this process's live children (QEMU, qemu-storage-daemon), from /proc."""
    total = 0
    for pid in own_children():
        with contextlib.suppress(OSError):  # it ended meanwhile: counted by RUSAGE_CHILDREN instead
            total += cpu_ticks(pid)
    return total / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


async def bench_throughput(
    settings: Settings, snapshot_dir: Path, clients: int, total: int
) -> dict[str, Any]:
    """Also measures the CPU all of it costs (this process + every QEMU/daemon it ran, from the
    start of the timed runs to the Scheduler closed): under TCG that, not latency, caps runs/s."""
    latencies: list[float] = []
    hits = restored = 0
    config = {"warm_pool_size": clients}
    async with new_scheduler(settings, snapshot_dir, **config) as sched:
        await sched.prewarm(["python"], timeout_seconds=300)
        remaining = total

        async def client() -> None:
            nonlocal remaining, hits, restored
            while remaining > 0:
                remaining -= 1
                ms, r = await timed(lambda: sched.run(CODE))
                latencies.append(ms)
                hits += r.warm_pool_hit
                restored += r.restored_from_snapshot

        live_before = _child_cpu_s()
        self_before, reaped_before = _own_cpu_s()
        t = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t
    self_after, reaped_after = _own_cpu_s()
    cpu_s = (self_after - self_before) + (reaped_after - reaped_before) - live_before
    cpus = os.cpu_count() or 1
    per_run_ms = cpu_s / total * 1000
    return {
        "clients": clients,
        "config": config,
        "runs": total,
        "wall_s": round(wall, 2),
        "runs_per_s": round(total / wall, 2),
        "latency": summary(latencies),
        "warm_pool_hits": hits,
        "restored": restored,
        "cpu_ms_per_run": round(per_run_ms, 1),
        "cpu_bound_ceiling_runs_per_s": round(cpus * 1000 / per_run_ms, 1),
    }

def _smaps_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            out[parts[0][:-1].lower()] = int(parts[1])
    return out


async def bench_idle(settings: Settings, snapshot_dir: Path, count: int, idle_s: float) -> dict[str, Any]:
    # Admission defaults: idle sessions hold memory only (see bench/density.py for 200 of them).
    config = {"session_idle_timeout_seconds": 3600.0}
    async with new_scheduler(settings, snapshot_dir, **config) as sched:
        sessions = []
        try:
            for _ in range(count):
                s = await sched.session()
                await s.exec("x = 1")
                sessions.append(s)
            pids = [s.vm.machine.pid for s in sessions if s.vm.machine.pid is not None]
            await asyncio.sleep(2.0)  # let the guests go idle
            ticks0 = {pid: cpu_ticks(pid) for pid in pids}
            await asyncio.sleep(idle_s)
            ticks1 = {pid: cpu_ticks(pid) for pid in pids}
            mem = [_smaps_kib(pid) for pid in pids]
            restored = sum(s.restored_from_snapshot for s in sessions)
            budget_mb = sched.admission.memory_budget_mb
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
    hz = os.sysconf("SC_CLK_TCK")
    cpu = [(ticks1[p] - ticks0[p]) / hz / idle_s * 100 for p in pids]
    pss = [m["pss"] / 1024 for m in mem]
    rss = [m["rss"] / 1024 for m in mem]
    host_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20

    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "median": round(statistics.median(ordered), 2),
            "p95": round(p95(ordered), 2),
            "max": round(ordered[-1], 2),
        }

    return {
        "vms": len(pids),
        "restored": restored,
        "pss_mib": stats(pss),
        "rss_mib": stats(rss),
        "cpu_percent_of_a_core": stats(cpu),
        "idle_seconds": idle_s,
        "fit_on_host_at_median_pss": int(host_mb // max(statistics.median(pss), 0.001)),
        "admission_memory_budget_mb": budget_mb,
    }


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    n = {
        "cold": 3 if quick else 10,
        "l1": 8 if quick else 30,
        "pool": 8 if quick else 30,
        "session": 20 if quick else 100,
        "py": 20 if quick else 50,
        "plain": 3 if quick else 10,
        "tp_total": 20 if quick else 60,
        "tp_clients": 4,
        "idle_vms": 8 if quick else 30,
    }
    idle_s = 3.0 if quick else 10.0
    settings = Settings(force_emulation=True) if args.force_emulation else Settings()
    accel = choose_accelerator("tcg" if settings.force_emulation else None)
    root = Path(tempfile.mkdtemp(prefix="sbx-bench-", dir="/var/tmp"))
    snapshots = root / "snapshots"
    started, load_start = time.time(), loadavg()
    out: dict[str, Any] = {}
    try:
        py = await bench_python_subprocess(n["py"])
        out["baseline_python3_c"] = py["python3_c_print1"]
        plain = await bench_plain_qemu(settings, n["plain"])
        out["baseline_plain_qemu"] = {
            "kernel": plain["kernel"],
            "accelerator": plain["accelerator"],
            "to_userspace": plain["to_userspace_marker"],
            "to_exit": plain["to_qemu_exit"],
        }
        out["cold"] = await bench_cold(settings, snapshots, n["cold"])
        out["l1"] = await bench_l1(settings, snapshots, n["l1"])
        out["l1_javascript"] = await bench_l1(settings, snapshots, n["l1"], "javascript", "console.log(1)")
        out["warm_pool"] = await bench_warm_pool(settings, snapshots, n["pool"])
        out["session"] = await bench_session(settings, snapshots, n["session"])
        out["throughput"] = await bench_throughput(settings, snapshots, n["tp_clients"], n["tp_total"])
        out["idle"] = await bench_idle(settings, snapshots, n["idle_vms"], idle_s)
        # Baselines again at the end: the host is shared, so the load may have changed meanwhile.
        out["baseline_python3_c_end"] = (await bench_python_subprocess(n["py"]))["python3_c_print1"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    py_ms = out["baseline_python3_c"]["median_ms"]
    plain_ms = out["baseline_plain_qemu"]["to_userspace"]["median_ms"]
    med = {
        "cold_run_ms": out["cold"]["run"]["median_ms"],
        "l1_run_ms": out["l1"]["run"]["median_ms"],
        "warm_pool_run_ms": out["warm_pool"]["run"]["median_ms"],
        "session_exec_ms": out["session"]["exec"]["median_ms"],
    }
    out["ratios"] = {
        **{f"{k[:-3]} / python3 -c": round(v / py_ms, 2) for k, v in med.items()},
        **{f"{k[:-3]} / plain QEMU boot to userspace": round(v / plain_ms, 3) for k, v in med.items()},
        "cold_run / l1_run": round(med["cold_run_ms"] / med["l1_run_ms"], 1),
        "cold_run / warm_pool_run": round(med["cold_run_ms"] / med["warm_pool_run_ms"], 1),
    }
    measured = {
        **{k: v for k, v in med.items() if k in TARGETS},
        "throughput_runs_per_s": out["throughput"]["runs_per_s"],
        "idle_vm_pss_mib": out["idle"]["pss_mib"]["median"],
        "idle_vm_cpu_percent": out["idle"]["cpu_percent_of_a_core"]["median"],
    }
    higher_is_better = {"throughput_runs_per_s"}
    out["targets"] = {
        k: {
            "target": TARGETS[k],
            "measured": measured[k],
            "met": measured[k] >= TARGETS[k] if k in higher_is_better else measured[k] <= TARGETS[k],
        }
        for k in TARGETS
    }
    out["host"] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "accelerator": f"{accel.accel} ({accel.reason})",
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "mode": "quick" if quick else "full",
        "counts": {**n, "idle_seconds": idle_s},
    }
    return out


def _line(name: str, s: dict[str, Any], base: float | None = None) -> str:
    ratio = f"   x{s['median_ms'] / base:8.2f} python3 -c" if base else ""
    return f"  {name:<40} median {s['median_ms']:9.2f} ms   p95 {s['p95_ms']:9.2f} ms  (n={s['runs']}){ratio}"


def report(r: dict[str, Any]) -> str:
    py = r["baseline_python3_c"]["median_ms"]
    h = r["host"]
    lines = [
        f"accelerator: {h['accelerator']}   cpus: {h['cpus']}   mode: {h['mode']}",
        f"load average (1/5/15 min): start {h['loadavg_start']}  end {h['loadavg_end']}  (shared machine)",
        "baselines:",
        _line("python3 -c 'print(1)' subprocess", r["baseline_python3_c"]),
        _line("  ... again at the end", r["baseline_python3_c_end"]),
        _line("plain QEMU, Debian kernel -> userspace", r["baseline_plain_qemu"]["to_userspace"], py),
        _line("plain QEMU, Debian kernel -> QEMU exit", r["baseline_plain_qemu"]["to_exit"], py),
        "sandbox (public API, end to end):",
        _line("cold run (snapshots off)", r["cold"]["run"], py),
        _line("  of which boot", r["cold"]["boot_phase"]),
        f"  first run of a new combination (cold boot + snapshot save): "
        f"{r['l1']['first_run_cold_boot_and_save_ms']:.0f} ms",
        _line(f"L1-restore run ({r['l1']['restored']}/{r['l1']['runs']} restored)", r["l1"]["run"], py),
        _line("  of which restore", r["l1"]["restore_phase"]),
        _line(
            f"L1-restore run, javascript ({r['l1_javascript']['restored']}/{r['l1_javascript']['runs']})",
            r["l1_javascript"]["run"],
            py,
        ),
        _line(
            f"warm-pool run ({r['warm_pool']['hits']}/{r['warm_pool']['runs']} hits)",
            r["warm_pool"]["run"],
            py,
        ),
        _line("  of which execute", r["warm_pool"]["execute_phase"]),
        _line("session exec", r["session"]["exec"], py),
    ]
    tp = r["throughput"]
    lines += [
        f"  throughput: {tp['runs_per_s']:.2f} runs/s with {tp['clients']} concurrent clients "
        f"({tp['runs']} runs in {tp['wall_s']} s; {tp['warm_pool_hits']} pool hits, "
        f"{tp['restored']} restored)",
        _line("  latency under that load", tp["latency"], py),
        f"    CPU per run (host process + its QEMUs, incl. making the VM): {tp['cpu_ms_per_run']} ms"
        f" -> at most {tp['cpu_bound_ceiling_runs_per_s']} runs/s on {h['cpus']} cores",
    ]
    idle = r["idle"]
    lines += [
        f"  idle VMs: {idle['vms']} restored sessions: PSS median {idle['pss_mib']['median']} MiB "
        f"(p95 {idle['pss_mib']['p95']}), RSS median {idle['rss_mib']['median']} MiB; "
        f"CPU median {idle['cpu_percent_of_a_core']['median']} % of a core "
        f"(max {idle['cpu_percent_of_a_core']['max']})",
        f"    -> ~{idle['fit_on_host_at_median_pss']} such VMs fit in this host's RAM at that PSS",
        "ratios (medians):",
        *(f"  {k}: {v}" for k, v in r["ratios"].items()),
        "targets (issue 5):",
        *(
            f"  {k:<24} target {v['target']:>8}   measured {v['measured']:>9}   "
            f"{'MET' if v['met'] else 'not met'}"
            for k, v in r["targets"].items()
        ),
        f"total bench time: {h['duration_s']} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts (~2-3 min smoke check)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--force-emulation", action="store_true", help="force TCG (default: automatic choice)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    # qemu.qmp logs a cancelled QMP handshake at ERROR: expected when close() stops a refill mid-restore.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
