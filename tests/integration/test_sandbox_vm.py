"""SandboxVm end to end: real guests (QEMU microvm under TCG), real images, the real guest agent.

Every test runs with ``sbx_leaks``: afterwards no QEMU / storage-daemon child, socket, overlay, VM
directory or guest RAM file may remain, whether the test's VMs succeeded, failed or were cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from exec_sandbox.errors import SandboxError, SandboxInputError, SandboxTransientError
from exec_sandbox.protocol.agent import ExitEvent, OutputEvent
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.spec import SandboxVmState, VmOptions
from exec_sandbox.vm_manager import VmManager
from tests.integration.conftest import LeakChecker

pytestmark = pytest.mark.integration

SMALL: dict[str, object] = {"memory_mb": 256, "vcpus": 1, "boot_timeout_s": 90.0}


async def boot(
    language: str,
    settings: Settings,
    images: VmManager,
    leaks: LeakChecker,
    *,
    options: dict[str, object] | None = None,
    overlay_pool: OverlayPool | None = None,
    on_boot_log: Callable[[str], None] | None = None,
) -> SandboxVm:
    """Boot a small VM in the leak checker's runtime dir with one of its VM ids."""
    return await SandboxVm.boot(
        VmOptions.model_validate({"language": language, **SMALL, **(options or {})}),
        settings=settings,
        vm_manager=images,
        overlay_pool=overlay_pool,
        runtime_dir=leaks.runtime_dir,
        on_boot_log=on_boot_log,
        vm_id=leaks.new_id(),
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def test_python_print(sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker) -> None:
    lines: list[str] = []
    vm = await boot("python", sbx_settings, sbx_images, sbx_leaks, on_boot_log=lines.append)
    async with vm:
        assert vm.state is SandboxVmState.READY and vm.alive
        assert vm.accelerator is not None and vm.accelerator.accel == "tcg"
        assert vm.hello is not None and "python" in vm.hello.languages
        assert vm.machine.pid is not None
        assert vm.timing.qemu_spawn_ms > 0 and vm.timing.boot_to_agent_ms > 0
        assert vm.timing.total_ms >= vm.timing.boot_to_agent_ms
        result = await vm.exec("print(1+1)")
        assert result.stdout == "2\n"
        assert result.stderr == ""
        assert result.exit_code == 0
    assert vm.state is SandboxVmState.CLOSED and not vm.alive
    await vm.close()  # idempotent
    with pytest.raises(SandboxTransientError, match="closed"):
        await vm.exec("print(1)")


async def test_javascript_console_log(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    async with await boot("javascript", sbx_settings, sbx_images, sbx_leaks) as vm:
        result = await vm.exec("const a = [1, 2, 3]; console.log(a.map(x => x * 2).join(','))")
        assert (result.stdout, result.exit_code) == ("2,4,6\n", 0)


async def test_raw_shell_echo_and_exit_code(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    async with await boot("raw", sbx_settings, sbx_images, sbx_leaks) as vm:
        result = await vm.exec("echo hello from $(uname -s); echo oops >&2; exit 7")
        assert result.stdout == "hello from Linux\n"
        assert result.stderr == "oops\n"
        assert result.exit_code == 7


async def test_streamed_output_arrives_in_order_before_exit(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    """The guest waits for a file the host writes only after seeing the first line: output must stream."""
    code = (
        "import os, sys, time\n"
        "print('line-0', flush=True)\n"
        "while not os.path.exists('go'):\n"
        "    time.sleep(0.05)\n"
        "for i in range(1, 4):\n"
        "    print(f'line-{i}', flush=True)\n"
        "    time.sleep(0.2)\n"
        "sys.exit(5)\n"
    )
    async with await boot("python", sbx_settings, sbx_images, sbx_leaks) as vm:
        chunks: list[str] = []
        exit_event: ExitEvent | None = None
        released = False
        events = vm.agent.exec_events(code, language="python", timeout_s=60)
        async for event in events:
            if isinstance(event, OutputEvent):
                assert event.stream == "stdout"
                chunks.append(event.data)
                if not released and "line-0" in "".join(chunks):
                    assert exit_event is None
                    await vm.agent.write_file("go", b"1")  # concurrent request on the same link
                    released = True
            else:
                exit_event = event
        assert released
        assert exit_event is not None and exit_event.exit_code == 5
        assert "".join(chunks) == "line-0\nline-1\nline-2\nline-3\n"
        # several separate output events, not one blob at exit
        assert len(chunks) >= 2


async def test_nonzero_exit_codes(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    async with await boot("python", sbx_settings, sbx_images, sbx_leaks) as vm:
        assert (await vm.exec("import sys; sys.exit(3)")).exit_code == 3
        failed = await vm.exec("raise ValueError('boom')")
        assert failed.exit_code == 1
        assert "ValueError: boom" in failed.stderr
        shell = await vm.exec("exit 42", language="raw")
        assert shell.exit_code == 42


async def test_ten_megabyte_file_round_trip(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    data = secrets.token_bytes(10 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    async with await boot("python", sbx_settings, sbx_images, sbx_leaks) as vm:
        await vm.agent.write_file("blob.bin", data)
        in_guest = await vm.exec(
            "import hashlib; print(hashlib.sha256(open('blob.bin','rb').read()).hexdigest())"
        )
        assert in_guest.stdout.strip() == digest
        back = await vm.agent.read_file("blob.bin")
        assert hashlib.sha256(back).hexdigest() == digest
        target = tmp_path / "back.bin"
        await vm.agent.read_file("blob.bin", target)
        assert sha256_file(target) == digest
        entries = {e.name: e for e in await vm.agent.list_files(".")}
        assert entries["blob.bin"].size == len(data)


async def test_writes_stay_in_the_vms_own_overlay(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    base = (await sbx_images.aget_bundle("python")).rootfs
    base_digest = sha256_file(base)
    pool_dir = sbx_leaks.watch_dir(sbx_leaks.runtime_dir.with_name(sbx_leaks.runtime_dir.name + "-pool"))
    async with OverlayPool(max_concurrent_vms=2, pool_dir=pool_dir) as pool:
        await pool.start([base])
        await pool.wait_filled()
        async with await boot("python", sbx_settings, sbx_images, sbx_leaks, overlay_pool=pool) as first:
            assert first.timing.overlay_from_pool
            assert first.overlay.exists() and first.overlay.parent == sbx_leaks.runtime_dir
            await first.agent.write_file("secret.txt", b"only in the first VM")
            written = await first.exec(
                "import os\nopen('/home/sandbox/disk.txt','w').write('x' * 100000)\nos.sync()\n"
                "print(open('secret.txt').read())"
            )
            assert written.stdout == "only in the first VM\n"
            async with await boot("python", sbx_settings, sbx_images, sbx_leaks, overlay_pool=pool) as second:
                assert second.overlay != first.overlay
                probe = await second.exec(
                    "import os; print(os.path.exists('secret.txt'), os.path.exists('/home/sandbox/disk.txt'))"
                )
                assert probe.stdout == "False False\n"
                names = [e.name for e in await second.agent.list_files(".")]
                assert "secret.txt" not in names
    assert sha256_file(base) == base_digest


async def test_pause_resume_keeps_state(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    async with await boot("python", sbx_settings, sbx_images, sbx_leaks) as vm:
        await vm.exec("counter = 41", session=True)
        await vm.pause()
        assert vm.state is SandboxVmState.PAUSED
        assert await vm.machine.query_status() == "paused"
        with pytest.raises(SandboxTransientError, match="paused"):
            await vm.exec("print(counter)", session=True)
        # A request sent to a paused guest is not answered until it runs again.
        pending = asyncio.ensure_future(vm.agent.exec("print(counter + 1)", language="python", session=True))
        done, _ = await asyncio.wait({pending}, timeout=1.0)
        assert not done
        await vm.resume()
        assert vm.state is SandboxVmState.READY
        assert (await pending).stdout == "42\n"
        assert (await vm.exec("counter += 1; print(counter)", session=True)).stdout == "42\n"


async def _snapshot_of_session(vm: SandboxVm, directory: Path, token: str) -> Path:
    await vm.exec(f"secret = {token!r}\nimport random", session=True)
    await vm.agent.write_file("state.txt", token.encode())
    return await vm.save_snapshot(directory)


async def test_snapshot_restore_keeps_memory_and_disk_state(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    token = secrets.token_hex(8)
    snap = tmp_path / "snap"
    async with await boot(
        "python", sbx_settings, sbx_images, sbx_leaks, options={"shared_memory": True}
    ) as original:
        await _snapshot_of_session(original, snap, token)
        assert original.state is SandboxVmState.READY  # kept running after the snapshot
        assert sorted(p.name for p in snap.iterdir()) == [
            "disk.qcow2",
            "memory",
            "sandbox.json",
            "vmstate",
            "vmstate.qemu.json",
        ]
        # The original goes on independently of the snapshot.
        await original.exec("secret = 'changed'", session=True)
        await original.agent.write_file("state.txt", b"changed")
        original_pid = original.machine.pid
        with pytest.raises(SandboxInputError, match="exists"):
            await original.save_snapshot(snap)

        async with await SandboxVm.restore_from(
            snap, settings=sbx_settings, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        ) as restored:
            assert restored.machine.pid not in (None, original_pid)
            assert restored.timing.restored and restored.timing.reseed_ms > 0
            assert restored.overlay != original.overlay
            assert (await restored.exec("print(secret)", session=True)).stdout == f"{token}\n"
            assert (await restored.agent.read_file("state.txt")) == token.encode()
            assert (await original.exec("print(secret)", session=True)).stdout == "changed\n"


async def test_snapshot_with_streamed_ram_restores_too(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    """Without shared_memory the RAM travels inside vmstate; no separate memory file is written."""
    snap = tmp_path / "snap"
    async with await boot("python", sbx_settings, sbx_images, sbx_leaks) as original:
        await _snapshot_of_session(original, snap, "streamed")
    assert not (snap / "memory").exists()
    async with await SandboxVm.restore_from(
        snap, settings=sbx_settings, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
    ) as restored:
        assert (await restored.exec("print(secret)", session=True)).stdout == "streamed\n"
        assert (await restored.agent.read_file("state.txt")) == b"streamed"


async def test_restored_clones_get_distinct_randomness(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    async with await boot(
        "python", sbx_settings, sbx_images, sbx_leaks, options={"shared_memory": True}
    ) as original:
        await _snapshot_of_session(original, snap, "clone")
    probe = "import os, random; print(os.urandom(16).hex(), random.getrandbits(64))"
    outputs: list[list[str]] = []
    in_session: list[str] = []
    for _ in range(2):
        async with await SandboxVm.restore_from(
            snap, settings=sbx_settings, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        ) as clone:
            assert (await clone.exec("print(secret)", session=True)).stdout == "clone\n"
            result = await clone.exec(probe)
            assert result.exit_code == 0, result.stderr
            outputs.append(result.stdout.split())
            # The session REPL imported random before the snapshot: its state must not be shared.
            in_session.append((await clone.exec("print(random.getrandbits(64))", session=True)).stdout)
    assert outputs[0][0] != outputs[1][0]
    assert outputs[0][1] != outputs[1][1]
    assert in_session[0] != in_session[1]


async def test_restore_rejects_a_directory_that_is_not_a_snapshot(
    sbx_settings: Settings, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    (tmp_path / "sandbox.json").write_text("{}")
    with pytest.raises(SandboxInputError, match="not a sandbox snapshot"):
        await SandboxVm.restore_from(tmp_path, settings=sbx_settings, runtime_dir=sbx_leaks.runtime_dir)


async def test_guest_that_never_gets_an_agent_fails_transiently_and_cleans_up(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    """A bogus init: the kernel panics, QEMU exits, boot fails fast with the console in context."""
    lines: list[str] = []
    with pytest.raises(SandboxTransientError) as info:
        await boot(
            "python",
            sbx_settings,
            sbx_images,
            sbx_leaks,
            options={"kernel_args": ("init=/no/such/init",)},
            on_boot_log=lines.append,
        )
    assert any("/no/such/init" in line for line in lines)  # the console reached on_boot_log
    assert "before the guest agent answered" in info.value.message
    assert "/no/such/init" in info.value.context["console_tail"]
    assert info.value.context["phase"] == "boot"


async def test_boot_timeout_fails_transiently_and_cleans_up(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    await sbx_images.aget_bundle("python")  # not part of the boot timeout, but keep the test focused
    with pytest.raises(SandboxTransientError, match=r"not ready within 0\.3s") as info:
        await boot("python", sbx_settings, sbx_images, sbx_leaks, options={"boot_timeout_s": 0.3})
    assert info.value.context["vm_id"].startswith(sbx_leaks.prefix)


async def test_cancelled_boot_leaves_nothing(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    await sbx_images.aget_bundle("python")
    task = asyncio.ensure_future(boot("python", sbx_settings, sbx_images, sbx_leaks))

    def qemu_running() -> bool:
        return any(comm.startswith("qemu-system") for _, comm in sbx_leaks.qemu_children())

    try:
        # Cancel once QEMU is running (the guest is still booting: the agent needs far longer).
        for _ in range(3000):
            if qemu_running() or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "boot finished before it could be cancelled"
        assert qemu_running()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            vm = await task
            await vm.close()  # only reached when the test already failed above
    assert task.cancelled()


async def test_cancelled_exec_keeps_vm_usable(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    async with await boot("python", sbx_settings, sbx_images, sbx_leaks) as vm:
        started = asyncio.Event()
        run = asyncio.ensure_future(
            # One write: print() writes "go" and the newline separately, and a cancel landing while the
            # second event is queued is swallowed by AgentClient._next (asyncio.wait_for on 3.11).
            vm.exec(
                "import sys, time; sys.stdout.write('go\\n'); sys.stdout.flush(); time.sleep(600)",
                on_stdout=lambda _: started.set(),
            )
        )
        await asyncio.wait_for(started.wait(), 60)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert (await vm.exec("print('still here')")).stdout == "still here\n"


async def test_invalid_options_are_input_errors() -> None:
    with pytest.raises(ValueError, match="language"):
        VmOptions.model_validate({"language": "cobol"})
    with pytest.raises(ValueError, match="kernel argument"):
        VmOptions(language="python", kernel_args=("two words",))
    with pytest.raises(ValueError, match="memory_mb"):
        VmOptions(language="python", memory_mb=1)


async def test_qemu_killed_under_a_ready_vm_is_reported_and_cleaned_up(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    vm = await boot("python", sbx_settings, sbx_images, sbx_leaks)
    try:
        assert vm.machine.pid is not None
        os.kill(vm.machine.pid, signal.SIGKILL)
        await vm.machine.wait()
        with pytest.raises(SandboxError):
            await vm.exec("print(1)")
        assert not vm.alive
    finally:
        await vm.close()
    assert vm.state is SandboxVmState.CLOSED
