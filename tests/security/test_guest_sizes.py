"""Attack: the guest lies about sizes (issue 10, item 4) - real TCG VMs through Scheduler/Session.

The host enforces every file cap itself while the bytes arrive: a file read stops at the cap with
:class:`GuestFileTooLargeError` (path, cap, bytes received) and never buffers more than the cap,
however large the file is or grows after a size check. Large files stream through
``Session.iter_file`` / ``read_file(path, Path)`` with bounded host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import GuestFileTooLargeError, SandboxInputError
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests
from tests.support.hostile_code import grow_when_read
from tests.support.memory import MIB, RssPeak

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CAP = 10 * MIB
BOUND = 64 * MIB  # documented per-sandbox host memory bound above baseline


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests(SchedulerConfig(max_file_bytes=CAP)) as sched:
        yield sched


async def test_300_mb_sparse_file_read_with_a_10_mib_cap(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python") as s:
        made = await s.exec("import os\nwith open('huge.bin', 'wb') as f:\n    f.truncate(300 << 20)\n"
                            "print(os.stat('huge.bin').st_size)")
        assert made.stdout.strip() == str(300 << 20), made.stderr
        with RssPeak() as mem, pytest.raises(GuestFileTooLargeError) as info:
            await s.read_file("huge.bin")
        print(f"300 MB sparse file, in-memory read with a 10 MiB cap: {mem}")
        err = info.value
        assert (err.path, err.limit_bytes) == ("huge.bin", CAP)
        assert CAP < err.received_bytes <= CAP + MIB
        assert "huge.bin" in err.message and str(CAP) in err.message
        assert not isinstance(err, SandboxInputError)
        assert mem.growth < BOUND, str(mem)
    await assert_no_vms(scheduler)


async def test_a_large_file_streams_to_a_host_path_with_bounded_memory(
    scheduler: Scheduler, tmp_path: Path
) -> None:
    size = 48 * MIB
    async with await scheduler.session(language="python") as s:
        made = await s.exec(f"with open('big.bin', 'wb') as f:\n    f.truncate({size})")
        assert made.exit_code == 0, made.stderr
        target = tmp_path / "big.bin"
        with RssPeak() as mem:
            assert await s.read_file("big.bin", target, max_bytes=size) is None
        print(f"48 MiB to a host path: {mem}")
        assert target.stat().st_size == size
        assert stat.S_IMODE(target.stat().st_mode) == 0o600  # mkstemp's mode, renamed into place
        assert os.listdir(tmp_path) == ["big.bin"]  # no temp file left
        assert mem.growth < BOUND, str(mem)
        streamed = 0
        with RssPeak() as mem:
            async with contextlib.aclosing(s.iter_file("big.bin", max_bytes=size)) as chunks:
                async for chunk in chunks:
                    assert len(chunk) <= MIB
                    streamed += len(chunk)
        print(f"48 MiB through iter_file: {mem}")
        assert streamed == size
        assert mem.growth < BOUND, str(mem)
        # A symlink planted at the destination is refused, and its target is untouched.
        victim = tmp_path / "victim"
        victim.write_bytes(b"keep")
        link = tmp_path / "link"
        link.symlink_to(victim)
        with pytest.raises(SandboxInputError, match="symbolic link"):
            await s.read_file("big.bin", link, max_bytes=size)
        assert victim.read_bytes() == b"keep" and link.is_symlink()
        assert sorted(os.listdir(tmp_path)) == ["big.bin", "link", "victim"]
        # Past the cap: nothing is left at the destination.
        with pytest.raises(GuestFileTooLargeError):
            await s.read_file("big.bin", tmp_path / "capped.bin", max_bytes=CAP)
        assert not (tmp_path / "capped.bin").exists()
        assert sorted(os.listdir(tmp_path)) == ["big.bin", "link", "victim"]
    await assert_no_vms(scheduler)


async def test_a_file_grown_after_the_size_check_is_cut_at_the_cap(scheduler: Scheduler) -> None:
    """8 MiB at the size check (under the 10 MiB cap), then the guest appends 56 MiB as soon as the
    host starts reading: the host counts the bytes as they arrive and stops at the cap.

    (``run(download=...)`` checks the size the same way, then reads with the same cap; its one-shot
    process is gone by then, so the growth is staged in a session, whose interpreter lives on.)
    """
    async with await scheduler.session(language="python") as s:
        made = await s.exec(grow_when_read("grow.bin", initial_mib=8, grow_mib=56))
        assert made.exit_code == 0, made.stderr
        [entry] = [e for e in await s.list_files(".") if e.name == "grow.bin"]
        assert entry.size == 8 * MIB <= CAP  # the check passes ...
        with RssPeak() as mem, pytest.raises(GuestFileTooLargeError) as info:
            await s.read_file("grow.bin")  # ... and the file grows under the read
        print(f"file grown during the read: {mem}; {info.value.received_bytes} bytes had arrived")
        err = info.value
        assert (err.path, err.limit_bytes) == ("grow.bin", CAP)
        assert CAP < err.received_bytes <= CAP + MIB
        assert mem.growth < BOUND, str(mem)
        grown = await s.exec("import os, time\ntime.sleep(1)\nprint(os.stat('grow.bin').st_size)")
        assert int(grown.stdout) == 64 * MIB  # it really grew
    await assert_no_vms(scheduler)


async def test_a_directory_past_the_listing_cap_is_listed_in_part_and_the_session_lives(
    scheduler: Scheduler,
) -> None:
    # The host refuses a listing frame of more than MAX_LIST_ENTRIES entries as a protocol
    # violation; a guest directory that big is legitimate, so the agent sends the first ones by name.
    async with await scheduler.session(language="python") as s:
        made = await s.exec(
            "import os\nos.mkdir('many')\n"
            "for i in range(10_050):\n    open(f'many/f{i:05d}', 'w').close()\n"
        )
        assert made.exit_code == 0, made.stderr
        entries = await s.list_files("many")
        assert len(entries) == 10_000
        assert [e.name for e in entries[:2]] == ["f00000", "f00001"] and entries[-1].name == "f09999"
        assert (await s.exec("print(len(os.listdir('many')))")).stdout == "10050\n"  # still usable
    await assert_no_vms(scheduler)


async def test_a_read_stopped_at_the_cap_is_cancelled_in_the_guest(scheduler: Scheduler) -> None:
    """The host cancels a read it stops at the cap; the agent must stop streaming, or the next
    call waits behind the rest of a file that never ends (a thread keeps growing it)."""
    grow = (
        "import os, threading, time\n"
        "open('endless.bin', 'wb').close()\n"
        "def _grow():\n"
        "    end = time.monotonic() + 120\n"
        "    while time.monotonic() < end:\n"
        "        with open('endless.bin', 'r+b') as f:\n"
        "            f.truncate(os.fstat(f.fileno()).st_size + (64 << 20))  # sparse: no disk used\n"
        "        time.sleep(0.005)\n"
        "threading.Thread(target=_grow, daemon=True).start()\n"
        "time.sleep(0.2)\n"
    )
    async with await scheduler.session(language="python") as s:
        made = await s.exec(grow)
        assert made.exit_code == 0, made.stderr
        with pytest.raises(GuestFileTooLargeError):
            await s.read_file("endless.bin")
        async with asyncio.timeout(10):
            r = await s.exec("print(1)")
        assert r.stdout == "1\n", r.stderr
        # The agent (this interpreter's parent) is idle again, not still reading and encoding.
        r = await s.exec(
            "import os, time\n"
            "def _cpu():\n"
            "    with open(f'/proc/{os.getppid()}/stat') as f:\n"
            "        fields = f.read().rsplit(')', 1)[1].split()\n"
            "    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')\n"
            "c0, t0 = _cpu(), time.monotonic()\n"
            "time.sleep(2)\n"
            "print(round((_cpu() - c0) / (time.monotonic() - t0), 3))\n"
        )
        busy = float(r.stdout)
        print(f"agent CPU share after the capped read: {busy}")
        assert busy < 0.3, f"the agent still works on the abandoned read: {busy:.0%} of a CPU"
    await assert_no_vms(scheduler)
