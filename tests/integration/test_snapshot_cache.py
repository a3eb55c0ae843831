"""L1 snapshot cache end to end: real guests under TCG, real snapshot files, real QEMU restores.

One cold boot (module fixture) fills a cache; the tests copy or reuse it. Every test runs with
``sbx_leaks``: no QEMU child, overlay, socket or RAM file may remain afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox.errors import SandboxTransientError
from exec_sandbox.settings import Settings
from exec_sandbox.vm.snapshot_entries import SnapshotManifest
from exec_sandbox.vm.snapshots import SnapshotCache
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import VmManager
from tests.integration.conftest import LeakChecker, child_processes

pytestmark = pytest.mark.integration

OPTIONS = VmOptions(language="python", memory_mb=256, vcpus=1, boot_timeout_s=120.0)
REPL_PID = "import os; print(os.getpid())"


@pytest.fixture(scope="module")
def filled_cache(sbx_settings: Settings, sbx_images: VmManager) -> Iterator[tuple[Path, str]]:
    """A cache dir holding one python entry, and the PID of the snapshotted guest's session REPL."""
    root = Path(tempfile.mkdtemp(prefix="sbx-l1-", dir="/var/tmp"))
    runtime = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))

    async def fill() -> str:
        async with SnapshotCache(root / "cache", settings=sbx_settings, vm_manager=sbx_images) as cache:
            vm, restored = await cache.restore_or_boot(OPTIONS, runtime_dir=runtime)
            async with vm:
                assert restored is False
                assert vm.options.shared_memory  # a cold boot meant for the cache keeps RAM in a file
                pid = (await vm.exec(REPL_PID, session=True)).stdout.strip()
            await cache.wait_saved()
            assert cache.stats.saves == 1 and cache.stats.cold_boots == 1
            assert len(cache.entries()) == 1
        return pid

    try:
        pid = asyncio.run(fill())
        assert not [c for c in child_processes() if c[1].startswith("qemu")]
        yield root / "cache", pid
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def copy_cache(src: Path, dst: Path) -> Path:
    # cp keeps the guest RAM file sparse (shutil.copytree would write every zero).
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def cache_for(path: Path, settings: Settings, images: VmManager) -> SnapshotCache:
    return SnapshotCache(path, settings=settings, vm_manager=images)


async def test_second_vm_is_restored_from_the_snapshot_of_the_first(
    filled_cache: tuple[Path, str], sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    path, snapshot_repl_pid = filled_cache
    async with cache_for(path, sbx_settings, sbx_images) as cache:
        vm, restored = await cache.restore_or_boot(
            OPTIONS, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        )
        async with vm:
            assert restored is True
            assert vm.timing.restored and vm.timing.reseed_ms > 0
            assert cache.stats.restores == 1 and cache.stats.cold_boots == 0
            # The session REPL was not started now: it is the very process warmed before the snapshot.
            assert (await vm.exec(REPL_PID, session=True)).stdout.strip() == snapshot_repl_pid
            result = await vm.exec("print(1)")
            assert (result.exit_code, result.stdout) == (0, "1\n")
            await vm.agent.write_file("mine.txt", b"clone data")
        assert cache.entries() == [await cache.key_for(OPTIONS)]


async def test_restored_clones_draw_distinct_random_numbers(
    filled_cache: tuple[Path, str], sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    path, _ = filled_cache
    probe = "import os, random; print(os.urandom(16).hex(), random.random())"
    seen: list[tuple[list[str], list[str]]] = []
    async with cache_for(path, sbx_settings, sbx_images) as cache:
        for _ in range(2):
            vm, restored = await cache.restore_or_boot(
                OPTIONS, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
            )
            async with vm:
                assert restored is True
                in_repl = await vm.exec(probe, session=True)  # the REPL warmed before the snapshot
                one_shot = await vm.exec(probe)  # the spare interpreter warmed before the snapshot
                assert in_repl.exit_code == 0 and one_shot.exit_code == 0, (in_repl.stderr, one_shot.stderr)
                seen.append((in_repl.stdout.split(), one_shot.stdout.split()))
    (repl_a, shot_a), (repl_b, shot_b) = seen
    assert repl_a[0] != repl_b[0], "os.urandom repeated across clones (session REPL)"
    assert repl_a[1] != repl_b[1], "random.random repeated across clones (session REPL)"
    assert shot_a[0] != shot_b[0], "os.urandom repeated across clones (one-shot)"
    assert shot_a[1] != shot_b[1], "random.random repeated across clones (one-shot)"


async def test_corrupt_snapshot_is_discarded_and_never_restored(
    filled_cache: tuple[Path, str],
    sbx_settings: Settings,
    sbx_images: VmManager,
    sbx_leaks: LeakChecker,
    tmp_path: Path,
) -> None:
    path = copy_cache(filled_cache[0], tmp_path / "cache")
    async with cache_for(path, sbx_settings, sbx_images) as cache:
        key = await cache.key_for(OPTIONS)
        entry = cache.entry_dir(key)
        before = SnapshotManifest.model_validate_json((entry / "manifest.json").read_text())
        vmstate = entry / "snapshot" / "vmstate"
        data = bytearray(vmstate.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
        vmstate.write_bytes(bytes(data))

        vm, restored = await cache.restore_or_boot(
            OPTIONS, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        )
        async with vm:
            assert restored is False
            assert cache.stats.corrupt_discarded == 1
            assert cache.stats.restores == 0 and cache.stats.cold_boots == 1
            assert (await vm.exec("print(2)")).stdout == "2\n"
        await cache.wait_saved()
        # The cold boot wrote a fresh, valid entry under the same key.
        after = SnapshotManifest.model_validate_json((entry / "manifest.json").read_text())
        assert after.created_at > before.created_at
        assert [p.name for p in path.iterdir() if p.name.startswith((".tmp-", ".trash-"))] == []


async def test_changed_qemu_version_never_restores_the_old_snapshot(
    filled_cache: tuple[Path, str],
    sbx_settings: Settings,
    sbx_images: VmManager,
    sbx_leaks: LeakChecker,
    tmp_path: Path,
) -> None:
    path = copy_cache(filled_cache[0], tmp_path / "cache")
    real = shutil.which(sbx_settings.qemu_system_binary)
    assert real is not None
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "QEMU emulator version 7.2.99 (upgraded)"; exit 0; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    upgraded = sbx_settings.model_copy(update={"qemu_system_binary": str(wrapper)})
    old_key = await cache_for(path, sbx_settings, sbx_images).key_for(OPTIONS)
    async with cache_for(path, upgraded, sbx_images) as cache:
        new_key = await cache.key_for(OPTIONS)
        assert new_key != old_key
        vm, restored = await cache.restore_or_boot(
            OPTIONS, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        )
        async with vm:
            assert restored is False and cache.stats.restores == 0
        await cache.wait_saved()
        assert sorted(cache.entries()) == sorted([old_key, new_key])
        # Changing a VM setting is just as stale: a different memory size maps to another key.
        assert await cache.key_for(OPTIONS.model_copy(update={"memory_mb": 512})) != new_key


async def test_restore_after_close_is_refused(
    sbx_settings: Settings, sbx_images: VmManager, tmp_path: Path
) -> None:
    cache = cache_for(tmp_path / "cache", sbx_settings, sbx_images)
    await cache.aclose()
    await cache.aclose()  # idempotent
    with pytest.raises(SandboxTransientError, match="closed"):
        await cache.restore_or_boot(OPTIONS)


async def test_concurrent_caches_write_one_entry_and_share_it(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    # Two caches on one directory hold separate lock descriptions: to flock they are two processes.
    path = tmp_path / "cache"
    first = cache_for(path, sbx_settings, sbx_images)
    second = cache_for(path, sbx_settings, sbx_images)
    options = OPTIONS.model_copy(update={"env": {"SBX_TEST": "concurrent"}})  # a key of its own
    (vm_a, restored_a), (vm_b, restored_b) = await asyncio.gather(
        first.restore_or_boot(options, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()),
        second.restore_or_boot(options, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()),
    )
    async with vm_a, vm_b:
        assert restored_a is False and restored_b is False
    await first.aclose()
    await second.aclose()
    assert first.stats.saves + second.stats.saves == 1
    assert first.stats.save_skipped + second.stats.save_skipped == 1
    assert len(first.entries()) == 1
    assert [p.name for p in path.iterdir() if p.name.startswith((".tmp-", ".trash-"))] == []

    async with cache_for(path, sbx_settings, sbx_images) as third:
        vm, restored = await third.restore_or_boot(
            options, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        )
        async with vm:
            assert restored is True
            assert (await vm.exec("import os; print(os.environ['SBX_TEST'])")).stdout == "concurrent\n"
