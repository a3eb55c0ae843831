"""Fork a live sandbox VM: an independent clone with the same memory (interpreter state) and disk.

:func:`fork_vm` pauses the VM, snapshots memory + device state + its overlay into a private temp
directory, resumes it, and restores a clone from that snapshot in a fresh QEMU process. The clone
gets its own copy of the disk and a reseeded RNG (host entropy, before anything else runs), so the
two diverge from the fork point on: variables, files and random numbers are their own.

The temp snapshot is deleted once the clone runs (the clone's RAM is a private copy-on-write
mapping, which outlives the file's name). Nothing is left behind on failure or cancellation: the
clone's own restore undoes itself, and the temp directory is always removed.

Fork only an idle VM (no request in flight): a request running at the fork point would go on in
the clone with nobody listening for its answer. ``session.fork()`` holds the session's exec lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from exec_sandbox.errors import SandboxTransientError
from exec_sandbox.settings import Settings
from exec_sandbox.timing import elapsed_ms
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.spec import SandboxVmState
from smartvm.cleanup import shielded
from smartvm.hostfs import ensure_private_dir
from smartvm.leftovers import make_owned_dir, remove_owned_dir
from smartvm.qemu import UserNetSpec

__all__ = ["ForkTiming", "fork_vm"]

logger = logging.getLogger(__name__)


class ForkTiming:
    """Milliseconds of the last fork: how long the parent was paused and the whole fork."""

    __slots__ = ("parent_paused_ms", "total_ms")

    def __init__(self, parent_paused_ms: float = 0.0, total_ms: float = 0.0) -> None:
        self.parent_paused_ms = parent_paused_ms
        self.total_ms = total_ms

    def __repr__(self) -> str:
        return f"ForkTiming(parent_paused_ms={self.parent_paused_ms:.1f}, total_ms={self.total_ms:.1f})"


async def fork_vm(
    vm: SandboxVm,
    *,
    settings: Settings | None = None,
    runtime_dir: Path | None = None,
    vm_id: str | None = None,
    work_dir: Path | None = None,
    timing: ForkTiming | None = None,
    user_net: UserNetSpec | None = None,
) -> SandboxVm:
    """Clone ``vm`` (READY or PAUSED; it keeps its state) into a new, independent, READY VM.

    ``runtime_dir`` for the clone defaults to the parent's; ``work_dir`` (where the temporary
    snapshot lives) defaults to the clone's runtime dir. ``settings`` must name the same QEMU the
    parent runs (default: ``Settings()``). Fast when the parent keeps its RAM in a shared file
    (``VmOptions.shared_memory``, as cold boots of the snapshot cache do); otherwise the RAM is
    streamed into the snapshot. ``user_net``: the clone's own NIC backend (a networked parent's
    would otherwise be shared: its gateway, its host ports).
    """
    if vm.state not in (SandboxVmState.READY, SandboxVmState.PAUSED):
        raise SandboxTransientError(
            f"cannot fork sandbox VM {vm.vm_id} in state {vm.state.value!r}",
            context={"vm_id": vm.vm_id, "state": vm.state.value},
        )
    started = time.perf_counter()
    rdir = runtime_dir or vm.runtime_dir
    base = work_dir or rdir
    await asyncio.to_thread(ensure_private_dir, base)
    # Private (0700) and owned by a record: a reaper running meanwhile keeps it, a crash leaves it to one.
    tmp = await asyncio.to_thread(make_owned_dir, base, f"fork-{vm.vm_id}-", kind="fork")
    try:
        t = time.perf_counter()
        snapshot = await vm.save_snapshot(tmp / "snapshot")
        paused_ms = elapsed_ms(t)
        clone = await SandboxVm.restore_from(
            snapshot, settings=settings, runtime_dir=rdir, vm_id=vm_id, reseed=True, user_net=user_net
        )
    finally:
        # A cancellation must not leave a RAM-sized snapshot behind: finish removing it first.
        await shielded(asyncio.to_thread(remove_owned_dir, tmp))
    total_ms = elapsed_ms(started)
    if timing is not None:
        timing.parent_paused_ms, timing.total_ms = paused_ms, total_ms
    logger.info(
        "forked VM %s into %s in %.0f ms (parent paused %.0f ms)", vm.vm_id, clone.vm_id, total_ms, paused_ms
    )
    return clone
