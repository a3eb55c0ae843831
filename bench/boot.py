"""Boot benchmark: sandbox VM cold boot and agent round trip, beside baselines from the same run.

Measured (all wall clock, ``time.perf_counter``, medians and p95 over the runs):

* ``sandbox cold boot``: ``SandboxVm.boot()`` called -> returned with the guest agent's hello
  (overlay from an OverlayPool, QEMU spawn + QMP, kernel boot, init, agent start, first ping).
  Images are built/looked up once before the timed runs; each run is a fresh overlay and QEMU.
* ``print(1) round trip``: ``vm.exec("print(1)")`` in one ready VM, host call -> result: (a) a
  new python3 process in the guest each time, (b) ``session=True`` in the warmed python REPL
  (what a warm pool serves); plus the bare agent ``ping`` round trip.
* baseline ``plain QEMU + Debian cloud kernel``: ``qemu-system-x86_64 -M microvm,acpi=on`` (argv
  from smartvm's pure ``build_argv``, no QMP, no disk) booting Debian's stock
  ``linux-image-cloud-amd64`` vmlinuz with a busybox initramfs whose ``/init`` prints a marker and
  does ``reboot -f``. Reported: spawn -> marker on the serial console (kernel boot to userspace),
  and spawn -> QEMU exit. The packages are fetched with ``apt-get download`` + ``dpkg-deb -x``
  and cached under the exec-sandbox cache dir.
* baseline ``python3 -c 'print(1)'``: an unsandboxed subprocess on the host, spawn -> exit.
* ``--cold-runs N``: ``Scheduler.run("print(1)")`` end to end through the public API with memory
  snapshots and the warm pool off (every run boots a fresh VM), with its timing breakdown.
* ``--timeline``: one boot with the kernel argument ``sbx.trace``; prints the guest's own clock
  (``/proc/uptime``) at the kernel milestones (printk times, ``loglevel=7``), in init, in the agent,
  and around the first one-shot ``print(1)``. Only that boot is traced.

Usage: ``python bench/boot.py [--runs 10] [--rtt-runs 50] [--cold-runs 7] [--timeline] [--json out.json]``
(``--cold-only`` skips the other sections.)
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from percentile import p95

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import VmManager
from smartvm.qemu import QemuMachineSpec, build_argv, choose_accelerator

__all__ = ["main"]

MARKER = "SBX-BENCH-USERSPACE"
BASELINE_ARGS = (
    "console=ttyS0 quiet reboot=t panic=-1 tsc_early_khz=2600000 lpj=10400000 no_timer_check rdinit=/init"
)


def summary(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(p95(ordered), 2),
        "min_ms": round(ordered[0], 2),
        "runs": len(ordered),
    }


def fmt(name: str, s: dict[str, float]) -> str:
    return f"  {name:<44} median {s['median_ms']:9.2f} ms   p95 {s['p95_ms']:9.2f} ms   (n={s['runs']})"


# --------------------------------------------------------------------------- sandbox


async def bench_sandbox(settings: Settings, runs: int, rtt_runs: int, language: str) -> dict[str, Any]:
    manager = VmManager(settings)
    bundle = await manager.aget_bundle(language)
    options = VmOptions(language=language, memory_mb=256, vcpus=1)
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbx-bench-", dir="/tmp"))
    pool_dir = runtime_dir.with_name(runtime_dir.name + "-pool")
    boots: list[float] = []
    phases: dict[str, list[float]] = {"overlay_ms": [], "qemu_spawn_ms": [], "boot_to_agent_ms": []}
    accel = ""
    try:
        async with OverlayPool(max_concurrent_vms=2, pool_dir=pool_dir) as pool:
            await pool.start([bundle.rootfs])
            for _ in range(runs):
                await pool.wait_filled()
                t = time.perf_counter()
                vm = await SandboxVm.boot(
                    options, settings=settings, vm_manager=manager, overlay_pool=pool, runtime_dir=runtime_dir
                )
                boots.append((time.perf_counter() - t) * 1000)
                for key in phases:
                    phases[key].append(getattr(vm.timing, key))
                assert vm.accelerator is not None
                accel = f"{vm.accelerator.accel} ({vm.accelerator.reason})"
                await vm.close()
            async with await SandboxVm.boot(
                options, settings=settings, vm_manager=manager, overlay_pool=pool, runtime_dir=runtime_dir
            ) as vm:
                await vm.exec("print(0)")  # first exec warms the guest's page cache
                rtts, pings = [], []
                for _ in range(rtt_runs):
                    t = time.perf_counter()
                    result = await vm.exec("print(1)")
                    rtts.append((time.perf_counter() - t) * 1000)
                    if result.stdout != "1\n":
                        raise RuntimeError(f"unexpected output {result.stdout!r} / {result.stderr!r}")
                await vm.agent.warmup(["python"])
                await vm.exec("print(0)", session=True)
                sessions = []
                for _ in range(rtt_runs):
                    t = time.perf_counter()
                    result = await vm.exec("print(1)", session=True)
                    sessions.append((time.perf_counter() - t) * 1000)
                    if result.stdout != "1\n":
                        raise RuntimeError(f"unexpected session output {result.stdout!r} / {result.stderr!r}")
                for _ in range(rtt_runs):
                    t = time.perf_counter()
                    await vm.agent.ping()
                    pings.append((time.perf_counter() - t) * 1000)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        shutil.rmtree(pool_dir, ignore_errors=True)
    return {
        "accelerator": accel,
        "kernel": str(bundle.kernel),
        "kernel_flavor": bundle.kernel_flavor,
        "cold_boot": summary(boots),
        "cold_boot_phases": {k: summary(v) for k, v in phases.items()},
        "print1_round_trip": summary(rtts),
        "print1_session_round_trip": summary(sessions),
        "ping_round_trip": summary(pings),
    }


# --------------------------------------------------------------------------- cold Scheduler.run


async def bench_cold_run(settings: Settings, runs: int, language: str) -> dict[str, Any]:
    """``Scheduler.run("print(1)")`` with snapshots and the warm pool off: a cold boot every run."""
    code = "print(1)" if language == "python" else "console.log(1)" if language == "javascript" else "echo 1"
    snapshot_dir = Path(tempfile.mkdtemp(prefix="sbx-bench-snap-", dir="/tmp"))
    totals: list[float] = []
    parts: dict[str, list[float]] = {"boot_ms": [], "execute_ms": [], "overlay_ms": [], "setup_ms": []}
    loads: list[float] = []
    try:
        config = SchedulerConfig(enable_memory_snapshots=False, warm_pool_size=0)
        async with Scheduler(config, settings=settings, snapshot_dir=snapshot_dir) as sched:
            await sched.run(code, language=language)  # image lookup (or build) outside the timing
            for _ in range(runs):
                loads.append(os.getloadavg()[0])
                t = time.perf_counter()
                result = await sched.run(code, language=language)
                totals.append((time.perf_counter() - t) * 1000)
                if result.stdout != "1\n" or result.warm_pool_hit or result.restored_from_snapshot:
                    raise RuntimeError(f"not a cold run: {result!r}")
                for key in parts:
                    parts[key].append(getattr(result.timing, key))
    finally:
        shutil.rmtree(snapshot_dir, ignore_errors=True)
    return {
        "run": summary(totals),
        "phases": {k: summary(v) for k, v in parts.items()},
        "host_load_1min": [round(x, 2) for x in loads],
    }


_MILESTONES = (
    ("kernel: printk on", r"printk: console \[ttyS0\] enabled"),
    ("kernel: local APIC timer set up", r"smpboot: CPU0: "),
    ("kernel: root mounted", r"VFS: Mounted root"),
    ("kernel: init memory freed", r"Freeing unused kernel image \(initmem\)"),
    ("kernel: runs /sbin/init", r"Run /sbin/init as init process"),
)
_STAMP = re.compile(r"^\[\s*([0-9.]+)\] (.*)$")
_TRACE = re.compile(r"sbx-trace ([0-9.]+) (.*)$")


def parse_timeline(console: str) -> list[tuple[float, str]]:
    """(guest seconds since boot, event) from a traced boot's console, in time order."""
    events: list[tuple[float, str]] = []
    for line in console.splitlines():
        if match := _TRACE.search(line):
            events.append((float(match[1]), match[2]))
        elif match := _STAMP.match(line):
            for label, pattern in _MILESTONES:
                if re.search(pattern, match[2]):
                    events.append((float(match[1]), label))
    return sorted(events)


async def bench_timeline(settings: Settings, language: str) -> dict[str, Any]:
    """One traced cold boot + first one-shot exec; the guest's timeline and the host's view."""
    manager = VmManager(settings)
    options = VmOptions(language=language, memory_mb=256, vcpus=1, kernel_args=("loglevel=7", "sbx.trace"))
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbx-bench-tl-", dir="/tmp"))
    try:
        t = time.perf_counter()
        async with await SandboxVm.boot(
            options, settings=settings, vm_manager=manager, runtime_dir=runtime_dir
        ) as vm:
            boot_ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            result = await vm.exec("print(1)", refill_spare=False)
            exec_ms = (time.perf_counter() - t) * 1000
            await asyncio.sleep(0.2)  # the agent's last stamps follow its reply
            console = vm.console_output()
            hello_uptime = vm.hello.boot.uptime_s if vm.hello is not None else None
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
    if result.stdout != "1\n":
        raise RuntimeError(f"traced exec printed {result.stdout!r} / {result.stderr!r}")
    return {
        "host_boot_ms": round(boot_ms, 1),
        "host_first_exec_ms": round(exec_ms, 1),
        "hello_guest_uptime_s": hello_uptime,
        "events": [[round(ts, 3), what] for ts, what in parse_timeline(console)],
    }


# --------------------------------------------------------------------------- baselines


def _run(argv: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def fetch_debian_kernel(cache: Path) -> tuple[Path, Path]:
    """Debian's cloud kernel vmlinuz and a busybox initramfs printing MARKER; cached."""
    cache.mkdir(parents=True, exist_ok=True)
    kernels = sorted(cache.glob("root/boot/vmlinuz-*"))
    busybox = cache / "root/bin/busybox"
    if not kernels or not busybox.exists():
        depends = _run(["apt-cache", "depends", "--no-recommends", "linux-image-cloud-amd64"])
        image_pkg = next(
            line.split(":", 1)[1].strip()
            for line in depends.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line
        )
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        _run(["apt-get", "download", image_pkg, "busybox-static"], cwd=debs)
        for deb in debs.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(cache / "root")])
        kernels = sorted(cache.glob("root/boot/vmlinuz-*"))
    initrd = cache / "marker-initramfs.cpio.gz"
    if not initrd.exists():
        initrd.write_bytes(_marker_initramfs(busybox))
    return kernels[-1], initrd


def _marker_initramfs(busybox: Path) -> bytes:
    init = f"#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n/bin/busybox reboot -f\n".encode()
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""),
        ("dev", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, init),
    ]
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        out.write(header.encode() + encoded)
        out.write(b"\0" * ((4 - (110 + len(encoded)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
    return gzip.compress(out.getvalue())


async def _one_plain_boot(argv: list[str], timeout: float) -> tuple[float, float]:
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    marker_ms = -1.0
    seen = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await proc.stdout.read(4096):
                seen = (seen + chunk)[-4096:]
                if marker_ms < 0 and MARKER.encode() in seen:
                    marker_ms = (time.perf_counter() - t) * 1000
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if marker_ms < 0:
        raise RuntimeError(f"baseline VM never printed the marker; console tail: {seen[-500:]!r}")
    return marker_ms, (time.perf_counter() - t) * 1000


async def bench_plain_qemu(settings: Settings, runs: int) -> dict[str, Any]:
    kernel, initrd = await asyncio.to_thread(
        fetch_debian_kernel, settings.cache_dir / "bench" / "debian-kernel"
    )
    accel = choose_accelerator("tcg" if settings.force_emulation else None)
    spec = QemuMachineSpec(
        kernel=kernel,
        initrd=initrd,
        cmdline=BASELINE_ARGS,
        memory_mib=256,
        vcpus=1,
        acpi=True,
        accel=accel.accel,
        rng=False,
    )
    argv = build_argv(spec, binary=settings.qemu_system_binary)
    marker, exited = [], []
    for _ in range(runs):
        m, e = await _one_plain_boot(argv, timeout=120)
        marker.append(m)
        exited.append(e)
    return {
        "kernel": str(kernel),
        "accelerator": accel.accel,
        "argv": argv,
        "to_userspace_marker": summary(marker),
        "to_qemu_exit": summary(exited),
    }


async def bench_python_subprocess(runs: int) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "python3", "-c", "print(1)", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        times.append((time.perf_counter() - t) * 1000)
        if out != b"1\n":
            raise RuntimeError(f"python3 printed {out!r}")
    return {"python3_c_print1": summary(times)}


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(force_emulation=True) if args.force_emulation else Settings()
    started = time.time()
    extra: dict[str, Any] = {}
    if args.cold_runs:
        extra["cold_scheduler_run"] = await bench_cold_run(settings, args.cold_runs, args.language)
    if args.timeline:
        extra["timeline"] = await bench_timeline(settings, args.language)
    if args.cold_only:
        return {"host": _host(), "started_at": started, **extra}
    sandbox = await bench_sandbox(settings, args.runs, args.rtt_runs, args.language)
    plain = await bench_plain_qemu(settings, args.baseline_runs or args.runs)
    py = await bench_python_subprocess(args.rtt_runs)
    cold = sandbox["cold_boot"]["median_ms"]
    ratios = {
        "sandbox_cold_boot / plain_qemu_debian_kernel_to_userspace": round(
            cold / plain["to_userspace_marker"]["median_ms"], 2
        ),
        "sandbox_cold_boot / plain_qemu_debian_kernel_to_exit": round(
            cold / plain["to_qemu_exit"]["median_ms"], 2
        ),
        "sandbox_print1_round_trip / python3_c_subprocess": round(
            sandbox["print1_round_trip"]["median_ms"] / py["python3_c_print1"]["median_ms"], 2
        ),
        "sandbox_print1_session_round_trip / python3_c_subprocess": round(
            sandbox["print1_session_round_trip"]["median_ms"] / py["python3_c_print1"]["median_ms"], 2
        ),
    }
    return {
        "host": _host(),
        "started_at": started,
        "sandbox": sandbox,
        "baseline_plain_qemu": plain,
        "baseline_subprocess": py,
        "ratios": ratios,
        **extra,
    }


def _host() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def report_cold(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if cold := result.get("cold_scheduler_run"):
        lines.append(fmt("cold Scheduler.run('print(1)'), no snapshots", cold["run"]))
        lines += [fmt(f"  {k}", v) for k, v in cold["phases"].items()]
        lines.append(f"  host load (1 min) before each run: {cold['host_load_1min']}")
    if tl := result.get("timeline"):
        lines.append(
            f"traced boot: host saw the agent after {tl['host_boot_ms']} ms, first print(1) "
            f"took {tl['host_first_exec_ms']} ms; guest clock (s since boot):"
        )
        lines += [f"  {ts:7.3f}  {what}" for ts, what in tl["events"]]
    return lines


def report(result: dict[str, Any]) -> str:
    if "sandbox" not in result:
        return "\n".join(report_cold(result))
    sb, plain, py = result["sandbox"], result["baseline_plain_qemu"], result["baseline_subprocess"]
    lines = [
        f"accelerator: {sb['accelerator']}",
        f"sandbox kernel: {sb['kernel_flavor']} ({sb['kernel']})",
        fmt("sandbox cold boot -> agent ready", sb["cold_boot"]),
        *(fmt(f"  phase {k}", v) for k, v in sb["cold_boot_phases"].items()),
        fmt("sandbox exec print(1), new guest process", sb["print1_round_trip"]),
        fmt("sandbox exec print(1), warm session REPL", sb["print1_session_round_trip"]),
        fmt("sandbox agent ping round trip", sb["ping_round_trip"]),
        f"baseline: plain QEMU, Debian cloud kernel ({Path(plain['kernel']).name}, {plain['accelerator']})",
        fmt("  spawn -> /init marker (userspace)", plain["to_userspace_marker"]),
        fmt("  spawn -> QEMU exit after reboot -f", plain["to_qemu_exit"]),
        fmt("baseline: python3 -c 'print(1)' subprocess", py["python3_c_print1"]),
        "ratios (medians):",
        *(f"  {k}: {v}" for k, v in result["ratios"].items()),
        *report_cold(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="cold boots (default 10)")
    parser.add_argument("--rtt-runs", type=int, default=50, help="round trips (default 50)")
    parser.add_argument("--baseline-runs", type=int, default=0, help="plain QEMU boots (default: --runs)")
    parser.add_argument("--language", default="python", choices=["python", "javascript", "raw"])
    parser.add_argument("--force-emulation", action="store_true", help="force TCG")
    parser.add_argument("--cold-runs", type=int, default=0, help="cold Scheduler.run('print(1)') runs")
    parser.add_argument("--timeline", action="store_true", help="one traced boot: the guest's timeline")
    parser.add_argument("--cold-only", action="store_true", help="only --cold-runs / --timeline")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
