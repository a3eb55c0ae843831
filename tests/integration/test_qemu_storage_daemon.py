"""QemuStorageDaemon against a real qemu-storage-daemon, real qcow2 files made by qemu-img."""

# Blocking local-filesystem checks are fine in tests (ASYNC240).
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from exec_sandbox.errors import QemuStorageDaemonError, SandboxInputError
from exec_sandbox.storage.daemon import DaemonState, QemuStorageDaemon

pytestmark = pytest.mark.integration

BASE_SIZE = 32 * 1024 * 1024


def make_base(path: Path, fmt: str = "qcow2", size: int = BASE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


async def image_info(path: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"qemu-img info {path} failed"
    info: dict[str, Any] = json.loads(out)
    return info


async def qemu_img_check(path: Path) -> int:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "check", "-q", str(path), stdout=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def children_named(name: str) -> list[int]:
    """Live child processes of this test process with the given command name."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm == name[:15]:
            found.append(int(entry.name))
    return found


async def assert_valid_overlay(overlay: Path, base: Path) -> None:
    info = await image_info(overlay)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert await qemu_img_check(overlay) == 0


async def leftover_nodes_and_jobs(daemon: QemuStorageDaemon) -> tuple[object, object]:
    nodes = await daemon._execute("query-named-block-nodes")
    jobs = await daemon._execute("query-jobs")
    return nodes, jobs


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_base(tmp_path / "images" / "base.qcow2")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[QemuStorageDaemon]:
    d = QemuStorageDaemon()
    await d.start()
    yield d
    pid = d.pid
    await d.stop()
    assert pid is None or pid_gone(pid)


class TestLifecycle:
    async def test_start_stop_leaves_nothing(self, tmp_path: Path) -> None:
        runtime = tmp_path / "rt"
        daemon = QemuStorageDaemon(runtime_dir=runtime)
        await daemon.start()
        assert daemon.started and daemon.state is DaemonState.RUNNING
        pid, sock = daemon.pid, daemon.socket_path
        assert pid is not None and not pid_gone(pid)
        assert sock is not None and sock.is_socket() and sock.parent.parent == runtime
        assert os.getpgid(pid) == pid  # own process group, so the kill ladder reaches all of it
        await daemon.stop()
        assert daemon.state is DaemonState.STOPPED and not daemon.started
        assert pid_gone(pid)
        assert not sock.exists()
        assert list(runtime.iterdir()) == []
        assert daemon._process is None and daemon._socket_path is None

    async def test_operator_socket_is_a_second_monitor_beside_ours(self, tmp_path: Path) -> None:
        """Our QMP runs over an inherited socket; the listening one stays free for an operator."""
        base = make_base(tmp_path / "base.qcow2")
        async with QemuStorageDaemon(runtime_dir=tmp_path / "rt") as daemon:
            assert daemon.socket_path is not None
            operator = QMPClient("operator")
            await operator.connect(str(daemon.socket_path))
            try:
                version = await operator.execute("query-version")
                assert isinstance(version, dict) and version["qemu"]["major"] >= 7
                await daemon.create_overlay(base, tmp_path / "vm.qcow2")  # ours works meanwhile
            finally:
                await operator.disconnect()
            await daemon.create_overlay(base, tmp_path / "vm2.qcow2")
        assert (await image_info(tmp_path / "vm2.qcow2"))["backing-filename"] == str(base)

    async def test_stop_ladder_kills_a_daemon_that_does_not_answer(self, tmp_path: Path) -> None:
        daemon = QemuStorageDaemon(runtime_dir=tmp_path / "rt", stop_timeout=0.3)
        await daemon.start()
        pid = daemon.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # QMP quit and SIGTERM go unanswered; only SIGKILL works
        await daemon.stop()
        assert pid_gone(pid)
        assert daemon.state is DaemonState.STOPPED
        assert list((tmp_path / "rt").iterdir()) == []

    async def test_start_and_stop_are_idempotent(self) -> None:
        daemon = QemuStorageDaemon()
        await daemon.start()
        pid = daemon.pid
        await daemon.start()
        assert daemon.pid == pid
        await asyncio.gather(daemon.start(), daemon.start())
        assert daemon.pid == pid
        await daemon.stop()
        await daemon.stop()
        assert daemon.state is DaemonState.STOPPED
        assert pid is not None and pid_gone(pid)

    async def test_async_with_and_restart_after_stop(self, base: Path, tmp_path: Path) -> None:
        daemon = QemuStorageDaemon()
        async with daemon:
            first = daemon.pid
            await daemon.create_overlay(base, tmp_path / "a.qcow2")
        assert not daemon.started
        async with daemon:
            assert daemon.pid != first
            await daemon.create_overlay(base, tmp_path / "b.qcow2")
        assert first is not None and pid_gone(first)

    async def test_two_daemons_run_side_by_side(self, base: Path, tmp_path: Path) -> None:
        async with QemuStorageDaemon() as one, QemuStorageDaemon() as two:
            assert one.socket_path != two.socket_path and one.pid != two.pid
            await asyncio.gather(
                one.create_overlay(base, tmp_path / "one.qcow2"),
                two.create_overlay(base, tmp_path / "two.qcow2"),
            )
        assert (await image_info(tmp_path / "one.qcow2"))["backing-filename"] == str(base)
        assert (await image_info(tmp_path / "two.qcow2"))["backing-filename"] == str(base)

    async def test_missing_binary_is_a_clear_error_and_leaves_nothing(self, tmp_path: Path) -> None:
        runtime = tmp_path / "rt"
        daemon = QemuStorageDaemon("/nonexistent/qemu-storage-daemon", runtime_dir=runtime)
        with pytest.raises(QemuStorageDaemonError, match="Cannot run qemu-storage-daemon"):
            await daemon.start()
        assert not daemon.started and daemon.pid is None
        assert list(runtime.iterdir()) == []

    async def test_binary_that_exits_reports_exit_code_and_stderr(self, tmp_path: Path) -> None:
        script = tmp_path / "fake-qsd"
        script.write_text("#!/bin/sh\necho 'fake daemon: cannot start' >&2\nexit 3\n")
        script.chmod(0o755)
        daemon = QemuStorageDaemon(str(script), runtime_dir=tmp_path / "rt")
        with pytest.raises(QemuStorageDaemonError, match=r"exited with code 3.*fake daemon: cannot start"):
            await daemon.start()
        assert list((tmp_path / "rt").iterdir()) == []

    async def test_binary_that_never_listens_times_out_and_is_killed(self, tmp_path: Path) -> None:
        script = tmp_path / "silent-qsd"
        script.write_text("#!/bin/sh\necho 'still thinking' >&2\nexec sleep 60\n")
        script.chmod(0o755)
        daemon = QemuStorageDaemon(str(script), runtime_dir=tmp_path / "rt", start_timeout=0.5)
        with pytest.raises(QemuStorageDaemonError, match=r"did not become QMP-ready.*still thinking"):
            await daemon.start()
        assert children_named("sleep") == []
        assert list((tmp_path / "rt").iterdir()) == []

    async def test_daemon_dies_with_its_owner_and_leftovers_are_reaped(self, tmp_path: Path) -> None:
        runtime = tmp_path / "rt"
        owner = textwrap.dedent(
            f"""
            import asyncio, sys
            from pathlib import Path
            from exec_sandbox.storage.daemon import QemuStorageDaemon

            async def main():
                d = QemuStorageDaemon(runtime_dir=Path({str(runtime)!r}))
                await d.start()
                print(d.pid, flush=True)
                await asyncio.sleep(3600)

            asyncio.run(main())
            """
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", owner, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                daemon_pid = int(await proc.stdout.readline())
            assert not pid_gone(daemon_pid)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        async with asyncio.timeout(10):  # a deadline, not a speed assertion
            while not pid_gone(daemon_pid):
                await asyncio.sleep(0.01)
        assert len(list(runtime.iterdir())) == 1  # the dead owner's runtime dir
        async with QemuStorageDaemon(runtime_dir=runtime) as daemon:
            assert [p.name for p in runtime.iterdir()] == [daemon.socket_path.parent.name]  # type: ignore[union-attr]


class TestCreateOverlay:
    async def test_overlay_is_qcow2_backed_by_the_base(self, daemon: QemuStorageDaemon, base: Path) -> None:
        overlay = base.parent / "vm1.qcow2"
        await daemon.create_overlay(base, overlay)
        info = await image_info(overlay)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == BASE_SIZE
        assert info["backing-filename"] == str(base)
        assert info["backing-filename-format"] == "qcow2"
        assert await qemu_img_check(overlay) == 0
        assert await leftover_nodes_and_jobs(daemon) == ([], [])

    async def test_larger_size_and_refused_smaller_size(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path
    ) -> None:
        await daemon.create_overlay(base, tmp_path / "big.qcow2", size=2 * BASE_SIZE)
        assert (await image_info(tmp_path / "big.qcow2"))["virtual-size"] == 2 * BASE_SIZE
        with pytest.raises(SandboxInputError, match="smaller than the virtual size"):
            await daemon.create_overlay(base, tmp_path / "small.qcow2", size=BASE_SIZE // 2)
        assert not (tmp_path / "small.qcow2").exists()

    async def test_symlinked_base_keeps_the_given_path(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path
    ) -> None:
        link = tmp_path / "link-to-base.qcow2"
        link.symlink_to(base)
        await daemon.create_overlay(link, tmp_path / "o.qcow2")
        info = await image_info(tmp_path / "o.qcow2")
        assert info["backing-filename"] == str(link)
        assert info["full-backing-filename"] == str(link)

    async def test_relative_base_becomes_absolute(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(base.parent)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        await daemon.create_overlay(Path(base.name), elsewhere / "o.qcow2")
        assert (await image_info(elsewhere / "o.qcow2"))["backing-filename"] == str(base)

    @pytest.mark.parametrize("dirname", ["тест-日本語-🔥", "path with spaces", "a,b:c=d"])
    async def test_odd_characters_in_paths(
        self, daemon: QemuStorageDaemon, tmp_path: Path, dirname: str
    ) -> None:
        base = make_base(tmp_path / dirname / "base, image.qcow2")
        overlay = tmp_path / dirname / "overlay émoji,中文 x.qcow2"
        await daemon.create_overlay(base, overlay)
        info = await image_info(overlay)
        assert info["backing-filename"] == str(base)
        assert await qemu_img_check(overlay) == 0

    async def test_twenty_concurrent_overlays(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path
    ) -> None:
        overlays = [tmp_path / f"c{i}.qcow2" for i in range(20)]
        await asyncio.gather(*(daemon.create_overlay(base, o) for o in overlays))
        assert len({o.stat().st_ino for o in overlays}) == 20
        for overlay in overlays:
            assert (await image_info(overlay))["backing-filename"] == str(base)
        assert await leftover_nodes_and_jobs(daemon) == ([], [])

    async def test_writes_to_an_overlay_leave_base_and_siblings_alone(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path
    ) -> None:
        one, two = tmp_path / "one.qcow2", tmp_path / "two.qcow2"
        await daemon.create_overlay(base, one)
        await daemon.create_overlay(base, two)
        base_before = base.read_bytes()
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-c", "write -P 0xab 0 64k", str(one), stdout=asyncio.subprocess.DEVNULL
        )
        assert await proc.wait() == 0

        async def compare(a: Path, b: Path) -> int:
            p = await asyncio.create_subprocess_exec(
                "qemu-img", "compare", "-q", str(a), str(b), stdout=asyncio.subprocess.DEVNULL
            )
            return await p.wait()

        assert await compare(one, base) == 1  # differs
        assert await compare(two, base) == 0
        assert base.read_bytes() == base_before


class TestErrors:
    async def test_nonexistent_base(self, daemon: QemuStorageDaemon, tmp_path: Path) -> None:
        overlay = tmp_path / "o.qcow2"
        with pytest.raises(QemuStorageDaemonError, match="Failed to get image info") as err:
            await daemon.create_overlay(tmp_path / "missing.qcow2", overlay)
        assert "missing.qcow2" in str(err.value)
        assert not overlay.exists()
        assert daemon.started

    async def test_raw_base(self, daemon: QemuStorageDaemon, tmp_path: Path) -> None:
        raw = make_base(tmp_path / "raw.img", fmt="raw", size=1024 * 1024)
        with pytest.raises(QemuStorageDaemonError, match=r"not qcow2 format \(detected 'raw'\)"):
            await daemon.create_overlay(raw, tmp_path / "o.qcow2")
        assert not (tmp_path / "o.qcow2").exists()

    async def test_garbage_base_is_raw_too(self, daemon: QemuStorageDaemon, tmp_path: Path) -> None:
        fake = tmp_path / "fake.qcow2"
        fake.write_text("not a qcow2 file")
        with pytest.raises(QemuStorageDaemonError, match="not qcow2 format"):
            await daemon.create_overlay(fake, tmp_path / "o.qcow2")

    async def test_unwritable_target_dir(self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path) -> None:
        regular = tmp_path / "a-file"
        regular.write_text("x")
        with pytest.raises(QemuStorageDaemonError, match="Not a directory") as err:
            await daemon.create_overlay(base, regular / "o.qcow2")
        assert err.value.context["job_error"]
        assert await leftover_nodes_and_jobs(daemon) == ([], [])
        await daemon.create_overlay(base, tmp_path / "after.qcow2")  # the daemon is still fine

    async def test_existing_target_is_refused_untouched(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path
    ) -> None:
        existing = tmp_path / "taken.qcow2"
        existing.write_bytes(b"precious")
        with pytest.raises(SandboxInputError, match="already exists"):
            await daemon.create_overlay(base, existing)
        assert existing.read_bytes() == b"precious"

    async def test_qmp_error_carries_error_class(self, daemon: QemuStorageDaemon) -> None:
        with pytest.raises(QemuStorageDaemonError, match="blockdev-del") as err:
            await daemon._execute("blockdev-del", {"node-name": "no-such-node"})
        assert err.value.error_class == "GenericError"

    async def test_daemon_killed_externally_then_restarted(self, base: Path, tmp_path: Path) -> None:
        daemon = QemuStorageDaemon()
        await daemon.start()
        try:
            old_pid, old_sock = daemon.pid, daemon.socket_path
            assert old_pid is not None and old_sock is not None
            os.kill(old_pid, signal.SIGKILL)
            async with asyncio.timeout(10):
                while daemon.started:
                    await asyncio.sleep(0.01)
            assert daemon.state is DaemonState.FAILED
            with pytest.raises(QemuStorageDaemonError, match=r"died \(exit code -9\).*start\(\)"):
                await daemon.create_overlay(base, tmp_path / "o.qcow2")
            assert not (tmp_path / "o.qcow2").exists()
            await daemon.start()
            assert daemon.started and daemon.pid != old_pid
            assert not old_sock.parent.exists()
            await daemon.create_overlay(base, tmp_path / "o.qcow2")
            assert (await image_info(tmp_path / "o.qcow2"))["backing-filename"] == str(base)
        finally:
            await daemon.stop()


class TestCancellation:
    async def test_cancel_while_probing_the_base_kills_qemu_img(self, base: Path, tmp_path: Path) -> None:
        slow_qemu_img = tmp_path / "slow-qemu-img"
        slow_qemu_img.write_text("#!/bin/sh\nexec sleep 60\n")
        slow_qemu_img.chmod(0o755)
        async with QemuStorageDaemon(qemu_img=str(slow_qemu_img)) as daemon:
            fresh = make_base(tmp_path / "fresh-base.qcow2")  # never probed, so not in the info cache
            task = asyncio.create_task(daemon.create_overlay(fresh, tmp_path / "o.qcow2"))
            async with asyncio.timeout(10):
                while not children_named("sleep"):
                    await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert children_named("sleep") == []
            assert not (tmp_path / "o.qcow2").exists()
            assert daemon.started

    async def test_cancel_mid_qmp_leaves_no_file_node_or_job(
        self, daemon: QemuStorageDaemon, base: Path, tmp_path: Path
    ) -> None:
        await daemon.create_overlay(base, tmp_path / "warm.qcow2")  # base info now cached
        cancelled_with_file = 0
        for i in range(30):
            overlay = tmp_path / f"o{i}.qcow2"
            task = asyncio.create_task(daemon.create_overlay(base, overlay))
            while not overlay.exists() and not task.done():
                await asyncio.sleep(0)
            file_seen = overlay.exists()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                assert not overlay.exists(), f"partial overlay left after cancel #{i}"
                cancelled_with_file += file_seen
            else:
                assert (await image_info(overlay))["backing-filename"] == str(base)
            assert await leftover_nodes_and_jobs(daemon) == ([], [])
        assert cancelled_with_file > 0, "no cancellation landed while the overlay was being built"
        await daemon.create_overlay(base, tmp_path / "after.qcow2")

    async def test_stop_finishes_the_running_creation_and_refuses_queued_ones(
        self, base: Path, tmp_path: Path
    ) -> None:
        daemon = QemuStorageDaemon()
        await daemon.start()
        await daemon.create_overlay(base, tmp_path / "warm.qcow2")
        running, queued = tmp_path / "running.qcow2", tmp_path / "queued.qcow2"
        first = asyncio.create_task(daemon.create_overlay(base, running))
        second = asyncio.create_task(daemon.create_overlay(base, queued))
        while not running.exists() and not first.done():
            await asyncio.sleep(0)
        pid = daemon.pid
        await daemon.stop()
        await first
        await assert_valid_overlay(running, base)
        with pytest.raises(QemuStorageDaemonError, match=r"not started \(state: stopping\)"):
            await second
        assert not queued.exists()
        assert pid is not None and pid_gone(pid)
