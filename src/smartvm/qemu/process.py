"""Reaping what a dead owner left behind (spawning itself is :mod:`smartvm.process`).

* QEMU is spawned by :class:`smartvm.process.ChildProcess`: ``PR_SET_PDEATHSIG(SIGKILL)`` and its
  own process group, so it dies with the *thread* that forked it. That signal removes no files
  (sockets, the RAM file in ``/dev/shm/smartvm-<uid>/``) and is tied to a thread, not the process:
  hence owner records.
* Each VM has a private directory ``<runtime_dir>/<vm_id>/`` holding its sockets and an
  ``owner.json`` (owner pid + start time, QEMU pid + start time, the RAM file). The convention and
  the reaper are :mod:`smartvm.leftovers` (one for the whole project); this module re-exports them
  under their historical names.
"""

from __future__ import annotations

from smartvm.leftovers import (
    OWNER_FILE,
    OwnerRecord,
    default_runtime_dir,
    private_runtime_dir,
    private_shm_dir,
    process_start_ticks,
    read_owner_record,
    reap_leftovers,
    write_owner_record,
)

__all__ = [
    "OWNER_FILE",
    "OwnerRecord",
    "default_runtime_dir",
    "private_runtime_dir",
    "private_shm_dir",
    "process_start_ticks",
    "read_owner_record",
    "reap_leftovers",
    "write_owner_record",
]
