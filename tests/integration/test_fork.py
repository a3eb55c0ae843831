"""fork_vm with real guests under TCG: memory and disk diverge after the fork point.

The parent is cold-booted with its RAM in a shared file (the fast path); the child, a restored VM
whose RAM is a private mapping, is forked again to cover the streamed-RAM path.
"""

from __future__ import annotations

import pytest

from exec_sandbox.errors import SandboxTransientError
from exec_sandbox.settings import Settings
from exec_sandbox.vm.fork import ForkTiming, fork_vm
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.spec import SandboxVmState, VmOptions
from exec_sandbox.vm_manager import VmManager
from tests.integration.conftest import LeakChecker

pytestmark = pytest.mark.integration

PROBE = "import os, random; print(os.urandom(16).hex(), random.random())"


async def run(vm: SandboxVm, code: str) -> str:
    result = await vm.exec(code, session=True)
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def test_fork_gives_independent_memory_disk_and_randomness(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    options = VmOptions(language="python", memory_mb=256, boot_timeout_s=120.0, shared_memory=True)
    async with await SandboxVm.boot(
        options,
        settings=sbx_settings,
        vm_manager=sbx_images,
        runtime_dir=sbx_leaks.runtime_dir,
        vm_id=sbx_leaks.new_id(),
    ) as parent:
        await run(parent, "x = 1\ndef bump():\n    global x\n    x += 10\n")
        await parent.agent.write_file("shared.txt", b"before the fork")
        timing = ForkTiming()
        async with await fork_vm(
            parent, settings=sbx_settings, vm_id=sbx_leaks.new_id(), timing=timing
        ) as child:
            assert parent.state is SandboxVmState.READY and child.state is SandboxVmState.READY
            assert child.machine.pid != parent.machine.pid and child.overlay != parent.overlay
            assert child.timing.restored and child.timing.reseed_ms > 0
            assert timing.total_ms > 0 and timing.parent_paused_ms > 0

            await run(parent, "x = 2")
            assert await run(child, "print(x)") == "1\n"  # the child kept the fork-time value
            await run(child, "bump()")  # functions defined before the fork exist in the child
            assert await run(child, "print(x)") == "11\n"
            assert await run(parent, "print(x)") == "2\n"

            assert await child.agent.read_file("shared.txt") == b"before the fork"
            await parent.agent.write_file("parent_only.txt", b"p")
            await child.agent.write_file("child_only.txt", b"c")
            await child.agent.write_file("shared.txt", b"child version")
            parent_files = {f.name for f in await parent.agent.list_files(".")}
            child_files = {f.name for f in await child.agent.list_files(".")}
            assert "parent_only.txt" in parent_files and "parent_only.txt" not in child_files
            assert "child_only.txt" in child_files and "child_only.txt" not in parent_files
            assert await parent.agent.read_file("shared.txt") == b"before the fork"

            parent_rand = (await run(parent, PROBE)).split()
            child_rand = (await run(child, PROBE)).split()
            assert parent_rand[0] != child_rand[0] and parent_rand[1] != child_rand[1]

            # A restored VM keeps its RAM privately (not in a shared file): forking it streams RAM.
            async with await fork_vm(child, settings=sbx_settings, vm_id=sbx_leaks.new_id()) as grandchild:
                assert await run(grandchild, "print(x)") == "11\n"
                await run(grandchild, "x = 99")
                assert await run(child, "print(x)") == "11\n"
                assert await grandchild.agent.read_file("shared.txt") == b"child version"
            with pytest.raises(SandboxTransientError, match=r"cannot fork .* 'closed'"):
                await fork_vm(grandchild, settings=sbx_settings)
        # The temporary snapshot is gone; the parent is still fine after its child closed.
        assert [p for p in sbx_leaks.runtime_dir.iterdir() if p.name.startswith("fork-")] == []
        assert await run(parent, "print(x)") == "2\n"
