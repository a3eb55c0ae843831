"""Attack: tell clones apart - or rather, find that they cannot be told apart.

A forked session and a VM restored from the L1 memory snapshot start as byte-for-byte copies of
their parent guest. Without care they share its ``boot_id`` (which software uses to scope tokens,
locks and caches to "this boot"), its ``/etc/machine-id`` and its PID sequence (so a clone can
predict every PID its siblings will hand out). Each clone must report its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.sandbox.session import Session
from exec_sandbox.settings import Settings
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.snapshots import SnapshotCache
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import VmManager
from tests.integration import conftest as integration
from tests.integration.conftest import LeakChecker
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

pytestmark = pytest.mark.integration

# The real-guest fixtures of tests/integration (a conftest there is not seen from here).
sbx_settings = integration.sbx_settings
sbx_images = integration.sbx_images
sbx_runtime_dir = integration.sbx_runtime_dir
sbx_leaks = integration.sbx_leaks

# boot_id, machine-id and the PID the next new process gets (a child forked and reaped at once).
IDENTITY = r"""
import os
boot_id = open('/proc/sys/kernel/random/boot_id').read().strip()
try:
    machine_id = open('/etc/machine-id').read().strip()
except OSError:
    machine_id = '-'
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(boot_id, machine_id, pid)
"""


def parse(stdout: str) -> tuple[str, str, int]:
    boot_id, machine_id, pid = stdout.split()
    return boot_id, machine_id, int(pid)


def assert_all_distinct(seen: dict[str, tuple[str, str, int]]) -> None:
    for i, what in enumerate(("boot_id", "machine-id", "next PID")):
        values = {name: ident[i] for name, ident in seen.items()}
        assert len(set(values.values())) == len(values), f"{what} shared between clones: {values}"


@pytest_asyncio.fixture(loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests() as sched:
        yield sched


async def identity(s: Session) -> tuple[str, str, int]:
    r = await s.exec(IDENTITY)
    assert r.exit_code == 0, r.stderr
    return parse(r.stdout)


@pytest.mark.asyncio(loop_scope="module")
async def test_forked_sessions_have_their_own_boot_id_machine_id_and_pids(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python") as parent:
        # The parent has used its identity (the kernel makes boot_id on its first read).
        before = await identity(parent)
        first = await parent.fork()
        second = await parent.fork()
        async with first, second:
            seen = {
                "parent": await identity(parent),
                "fork 1": await identity(first),
                "fork 2": await identity(second),
            }
    assert seen["parent"][:2] == before[:2]  # the parent keeps its own
    boot_id = seen["parent"][0]
    assert len(boot_id) == 36 and boot_id.count("-") == 4, boot_id  # still a well-formed uuid
    assert len(seen["parent"][1]) == 32, seen["parent"][1]
    assert_all_distinct(seen)
    await assert_no_vms(scheduler)


async def test_restored_snapshot_clones_have_their_own_boot_id_machine_id_and_pids(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    options = VmOptions(language="python", memory_mb=256, vcpus=1, boot_timeout_s=120.0)
    root = Path(tempfile.mkdtemp(prefix="sbx-l1-", dir="/var/tmp"))
    seen: dict[str, tuple[str, str, int]] = {}

    async def probe(vm: SandboxVm) -> tuple[str, str, int]:
        r = await vm.exec(IDENTITY, session=True)
        assert r.exit_code == 0, r.stderr
        return parse(r.stdout)

    try:
        async with SnapshotCache(root / "cache", settings=sbx_settings, vm_manager=sbx_images) as cache:
            vm, restored = await cache.restore_or_boot(
                options, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
            )
            async with vm:
                assert restored is False
                await cache.wait_saved()
                seen["parent"] = await probe(vm)
            for n in (1, 2):
                vm, restored = await cache.restore_or_boot(
                    options, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
                )
                async with vm:
                    assert restored is True
                    seen[f"clone {n}"] = await probe(vm)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert_all_distinct(seen)
