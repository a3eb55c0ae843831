"""An idle guest is tickless: TSC clocksource, one-shot timer (local APIC), no periodic PIT tick.

Under TCG the guest's TSC is the host's, so the boot hint ``tsc_early_khz`` must carry the host's
rate (:func:`smartvm.qemu.argv.with_host_tsc`). With a wrong one the local-APIC timer fails its
calibration check, the TSC is marked unstable and the guest falls back to ``refined-jiffies`` and a
250 Hz PIT tick (~2.5 % of a host core per idle guest). These tests check the mechanism, not the
CPU figure: which clocksource and clock-event device are in use, and how many timer interrupts
arrive while the guest idles (counts; a periodic tick would add ~500 PIT interrupts in 2 s).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from exec_sandbox.client.agent import AgentClient
from exec_sandbox.vm_manager import ImageBundle
from smartvm.errors import SmartVMError
from smartvm.qemu import QemuMachine, QemuMachineSpec
from smartvm.qemu.argv import DriveSpec, with_host_tsc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

AGENT_PORT = "org.exec_sandbox.agent"
IDLE_WINDOW_S = 2.0
# A periodic 250 Hz tick gives ~500 interrupts in the window; tickless idle ~10-20 on the local APIC
# and ~100 when the PIT is the one-shot device (the agent's own requests included).
PERIODIC_TICKS_IN_WINDOW = int(250 * IDLE_WINDOW_S)


def _host_tsc_khz() -> int:
    # TCG's guest TSC ticks at the host TSC rate, which the host kernel reports as "cpu MHz".
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    assert match is not None, "no 'cpu MHz' in /proc/cpuinfo"
    return int(float(match.group(1)) * 1000)


def _interrupt_counts(text: str) -> dict[str, int]:
    """``/proc/interrupts`` of a one-vCPU guest: line label (``0``, ``LOC``...) -> count."""
    counts: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            counts[parts[0][:-1]] = int(parts[1])
    return counts


async def _raw(client: AgentClient, command: str) -> str:
    result = await client.exec(command, language="raw")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_with_host_tsc_replaces_baked_hints() -> None:
    baked = "console=ttyS0 tsc_early_khz=2600000 lpj=10400000 no_timer_check root=/dev/vda rw"
    args = with_host_tsc(baked, 2_100_000).split()
    assert [a for a in args if a.startswith(("tsc_early_khz=", "lpj=", "tsc="))] == [
        "tsc_early_khz=2100000",
        "lpj=8400000",
        "tsc=reliable",
    ]
    assert args.count("no_timer_check") == 1
    assert {"console=ttyS0", "root=/dev/vda", "rw"} <= set(args)
    assert with_host_tsc(" ".join(args), 2_100_000).split() == args  # idempotent
    with pytest.raises(SmartVMError, match="tsc_khz"):
        with_host_tsc(baked, 0)


async def test_idle_guest_is_tickless(
    python_bundle: ImageBundle, runtime_dir: Path, tmp_path: Path, machines: list[QemuMachine]
) -> None:
    overlay = tmp_path / "root.qcow2"
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(python_bundle.rootfs),
        "-F",
        "qcow2",
        str(overlay),
    )
    assert await proc.wait() == 0
    spec = QemuMachineSpec(
        kernel=python_bundle.kernel,
        initrd=python_bundle.initrd,
        # The bundle's own args (a baked TSC rate): QemuMachine must correct them under TCG.
        cmdline=python_bundle.boot_args,
        memory_mib=128,
        acpi=python_bundle.needs_acpi,
        drives=(DriveSpec(id="rootfs", path=overlay, format="qcow2"),),
    )
    machine = QemuMachine(spec, runtime_dir=runtime_dir, serial_ports=(AGENT_PORT,))
    machines.append(machine)
    await machine.start()

    client = await AgentClient.open_unix(machine.serial_socket(AGENT_PORT))
    async with client:
        await client.wait_ready(timeout=120)
        clock = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        event = "/sys/devices/system/clockevents/clockevent0/current_device"
        # The kernel starts on "tsc-early" and switches to "tsc" from a delayed work item once it has
        # refined the calibration (~1 s after boot, later on a loaded host): wait for the steady state.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            clocksource, clockevent = (await _raw(client, f"cat {clock} {event}")).split()
            if clocksource != "tsc-early" or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
        before = _interrupt_counts(await _raw(client, "cat /proc/interrupts"))
        await asyncio.sleep(IDLE_WINDOW_S)
        after = _interrupt_counts(await _raw(client, "cat /proc/interrupts"))
    await machine.stop()

    # jiffies-based clocksources cannot drive high-resolution timers, so NO_HZ idle never engages;
    # tsc=reliable keeps the TSC from being dropped by the PIT-driven watchdog
    assert clocksource == "tsc", clocksource
    # The local-APIC timer is the one-shot tick device when it passes its calibration check against
    # the PIT; under heavy host load TCG drops PIT ticks, the check fails and the PIT (also one-shot,
    # but at most ~27 ms per shot) takes over. Either way the tick must be one-shot, not periodic.
    assert clockevent in {"lapic", "pit"}, clockevent
    ticks = {label: after.get(label, 0) - before.get(label, 0) for label in ("0", "LOC")}
    assert sum(ticks.values()) < PERIODIC_TICKS_IN_WINDOW // 2, f"timer interrupts while idle: {ticks}"
