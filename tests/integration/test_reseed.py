"""reseed_rng reaches every interpreter that existed before it: session REPLs and spare one-shot ones.

A snapshot clone inherits every live interpreter's PRNG state; the tests preload ``random`` into the
spare through ``usercustomize`` (imported by every interpreter the sandbox user starts), so a spare
that is not reseeded hands identical numbers to every clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from exec_sandbox.client.agent import AgentClient
from exec_sandbox.errors import SandboxInputError
from exec_sandbox.protocol.agent import OutputEvent, ReseedResult
from exec_sandbox.settings import Settings
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.snapshots import warm_vm
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import VmManager
from tests.integration.conftest import LeakChecker
from tests.integration.test_agent_local import run_agent

pytestmark = pytest.mark.integration

# Records the interpreter's PRNG state at start-up, keyed by pid, for the probe below to compare.
USERCUSTOMIZE = (
    "import os, random\n"
    "with open(os.path.join(os.environ['HOME'], 'rng-%d' % os.getpid()), 'w') as f:\n"
    "    f.write(repr(random.getstate()))\n"
)
PROBE = (
    "import os, sys\n"
    "preloaded = 'random' in sys.modules\n"
    "import random\n"
    "with open(os.path.join(os.environ['HOME'], 'rng-%d' % os.getpid())) as f:\n"
    "    start = f.read()\n"
    "print(preloaded, repr(random.getstate()) == start, random.getrandbits(64))\n"
)


@contextlib.asynccontextmanager
async def local_agent(*args: str) -> AsyncIterator[AgentClient]:
    """The real agent on the host (see test_agent_local), ready."""
    async with run_agent(*args) as running, await AgentClient.open_unix(
        running.socket, connect_timeout=20
    ) as agent:
        await agent.wait_ready(timeout=30)
        yield agent


async def _user_site(agent: AgentClient) -> str:
    result = await agent.exec("import site; print(site.getusersitepackages())", language="python")
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


async def _fresh_spare_with_random(agent: AgentClient) -> None:
    """Install usercustomize, then make sure the spare in place was started after that."""
    site = await _user_site(agent)
    await agent.write_file(f"{site}/usercustomize.py", USERCUSTOMIZE.encode())
    # The spare that ran _user_site predates the file: use it up, then wait for its successor.
    assert (await agent.exec("pass", language="python")).exit_code == 0
    warm = await agent.warmup(["python"], session=False, spare=True)
    assert warm.ready == ["python"], warm.errors


async def _save_warm_snapshot(
    snap: Path, settings: Settings, images: VmManager, leaks: LeakChecker, *,
    prepare: Callable[[AgentClient], Awaitable[None]] | None = None,
) -> None:
    """Boot a Python VM, warm its session and spare interpreters (then ``prepare`` its agent), and
    save its snapshot to ``snap``."""
    options = VmOptions.model_validate(
        {"language": "python", "memory_mb": 256, "vcpus": 1, "boot_timeout_s": 90.0, "shared_memory": True}
    )
    async with await SandboxVm.boot(
        options, settings=settings, vm_manager=images, runtime_dir=leaks.runtime_dir, vm_id=leaks.new_id(),
    ) as original:
        await original.agent.warmup(["python"], session=True, spare=True)
        if prepare is not None:
            await prepare(original.agent)
        await original.save_snapshot(snap)


async def test_reseed_reaches_the_spare_interpreter() -> None:
    async with local_agent("--spare", "python") as agent:
        await _fresh_spare_with_random(agent)
        result = await agent.reseed_rng(secrets.token_bytes(64))
        assert result.spares_reseeded == ["python"]
        probe = await agent.exec(PROBE, language="python")
        assert probe.exit_code == 0, probe.stderr
        preloaded, unchanged, _value = probe.stdout.split()
        assert preloaded == "True"  # the exec ran in the spare that had random at start-up
        assert unchanged == "False"  # ... and its PRNG state was replaced by the reseed


async def test_reseed_of_a_busy_session_is_answered_and_applied_after_the_block() -> None:
    async with local_agent() as agent:
        await agent.exec("import random, sys, time\nbefore = random.getstate()", language="python",
                         session=True)
        events = agent.exec_events(
            "print('started'); sys.stdout.flush(); time.sleep(2)", language="python", session=True
        )
        busy = asyncio.ensure_future(events.__anext__())
        first = await busy
        assert isinstance(first, OutputEvent) and first.data.startswith("started")
        # The session is busy: the reply must not wait for it.
        result = await agent.reseed_rng(secrets.token_bytes(32))
        assert result.repls_reseeded == ["python"]
        async for _event in events:
            pass
        # The reseed runs once the block is done (it may race the next block by a moment).
        changed = ""
        for _ in range(50):
            changed = (await agent.exec("print(random.getstate() != before)", language="python",
                                        session=True)).stdout
            if changed == "True\n":
                break
            await asyncio.sleep(0.1)
        assert changed == "True\n"


async def test_restored_clones_spares_do_not_share_randomness(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    await _save_warm_snapshot(snap, sbx_settings, sbx_images, sbx_leaks, prepare=_fresh_spare_with_random)
    probes: list[list[str]] = []
    hashes: list[str] = []
    for _ in range(2):
        async with await SandboxVm.restore_from(
            snap, settings=sbx_settings, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
        ) as clone:
            restored = clone.reseed_result
            assert restored is not None
            assert restored.repls_reseeded == ["python"] and restored.spares_reseeded == ["python"]
            # Both interpreters came with the snapshot: warming up needs no round trip at all.
            heard = clone.agent.last_heard_at
            await warm_vm(clone)
            assert clone.agent.last_heard_at == heard
            probe = await clone.exec(PROBE)
            assert probe.exit_code == 0, probe.stderr
            probes.append(probe.stdout.split())
            # An interpreter started after the restore draws its own string-hash secret.
            hashed = await clone.exec("print(hash('exec-sandbox'))")
            assert hashed.exit_code == 0, hashed.stderr
            hashes.append(hashed.stdout)
    assert [p[0] for p in probes] == ["True", "True"]  # both ran in the snapshot's spare
    assert [p[1] for p in probes] == ["False", "False"]  # whose PRNG state the reseed replaced
    assert probes[0][2] != probes[1][2]
    assert hashes[0] != hashes[1]


async def test_a_restored_guest_reads_the_hosts_wall_clock_not_the_snapshots(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker, tmp_path: Path
) -> None:
    # A clone restored later than its snapshot was taken: without the step its clock reads the
    # snapshot's time, and TLS in the guest then refuses certificates issued since ("not yet valid").
    snap = tmp_path / "snap"
    await _save_warm_snapshot(snap, sbx_settings, sbx_images, sbx_leaks)
    await asyncio.sleep(4.0)
    async with await SandboxVm.restore_from(
        snap, settings=sbx_settings, runtime_dir=sbx_leaks.runtime_dir, vm_id=sbx_leaks.new_id()
    ) as clone:
        assert clone.reseed_result is not None and clone.reseed_result.clock_step_ms is not None
        assert clone.reseed_result.clock_step_ms > 3000.0, clone.reseed_result
        before = time.time()
        probe = await clone.exec("import time; print(time.time())")
        after = time.time()
        assert probe.exit_code == 0, probe.stderr
        # The stamp is one request's transit old when applied: the guest may trail by that much.
        assert before - 1.0 <= float(probe.stdout) <= after, (before, probe.stdout, after)


async def test_a_local_agent_never_sets_the_hosts_clock() -> None:
    async with run_agent() as running, await AgentClient.open_unix(
        running.socket, connect_timeout=20
    ) as agent:
        await agent.wait_ready(timeout=30)
        # 2 s ahead (were the guard broken, a small step forward is the least harm to this host)
        ahead = agent._reseed_request(secrets.token_bytes(32)).model_copy(
            update={"wall_time_ns": time.time_ns() + 2 * 10**9})
        async with agent._request(ahead) as (req_id, pending):
            result = await agent._expect(req_id, pending, ReseedResult, 30)
        assert result.clock_step_ms is None  # the agent is not PID 1 here: the clock is left alone


async def test_ready_and_reseeded_in_one_round_trip_then_as_a_plain_reseed() -> None:
    async with run_agent() as running, await AgentClient.open_unix(
        running.socket, connect_timeout=20
    ) as agent:
        hello, result = await agent.ready_and_reseeded(secrets.token_bytes(48), timeout=30)
        assert hello.instance and agent.hello is hello
        assert agent.first_hello_at is not None
        assert result.mixed_bytes == 48
        # Already ready: the same call is a plain reseed.
        again_hello, again = await agent.ready_and_reseeded(timeout=30)
        assert again_hello.instance == hello.instance and again.mixed_bytes == 64
        with pytest.raises(SandboxInputError, match=r"16\.\.4096"):
            await agent.ready_and_reseeded(b"short")


async def test_last_exec_does_not_refill_the_spare() -> None:
    async with local_agent("--spare", "python") as agent:
        warm = await agent.warmup(["python"], session=False, spare=True)
        assert warm.ready == ["python"]
        assert (await agent.ping()).boot.spares == ["python"]
        result = await agent.exec("print(7)", language="python", refill_spare=False)
        assert result.stdout == "7\n"
        await asyncio.sleep(1.5)  # a refill (~50 ms on the host) would be up by now
        assert (await agent.ping()).boot.spares == []
        # Execs still work (cold), and the default refills again.
        assert (await agent.exec("print(8)", language="python")).stdout == "8\n"
        spares: list[str] = []
        for _ in range(100):
            spares = (await agent.ping()).boot.spares
            if spares:
                break
            await asyncio.sleep(0.1)
        assert spares == ["python"]


async def test_a_priming_exec_keeps_the_spare_and_the_next_run_uses_it() -> None:
    async with local_agent("--spare", "python") as agent:
        warm = await agent.warmup(["python"], session=False, spare=True)
        assert warm.ready == ["python"]
        pid = "import os; print(os.getpid())"
        primed = await agent.exec(pid, language="python", prime_spare=True, refill_spare=False)
        assert primed.exit_code == 0, primed.stderr
        assert (await agent.ping()).boot.spares == ["python"]  # kept, not replaced
        run = await agent.exec(pid, language="python", refill_spare=False)
        assert run.stdout == primed.stdout  # the same interpreter process
        assert (await agent.ping()).boot.spares == []  # a real run uses it up, as always
        # Priming when there is no spare is an ordinary one-shot exec.
        again = await agent.exec(pid, language="python", prime_spare=True, refill_spare=False)
        assert again.exit_code == 0 and again.stdout != run.stdout
