"""Packages for sandboxes, resolved and downloaded on the host, cached as L2 disk layers.

``run(..., packages=["six"])`` / ``session(..., packages=["lodash@4"])``: the host resolves the
request with the user's own pip/npm configuration for the GUEST's interpreter and platform
(:mod:`~exec_sandbox.packages.pip`, :mod:`~exec_sandbox.packages.npm`), records the exact result as
a :class:`PackageLock`, installs it into a host tree and packs that as a read-only ext4 disk
(:mod:`~exec_sandbox.packages.staging`). A short-lived builder VM copies the disk into its root
filesystem; its qcow2 overlay becomes the L2 layer (:mod:`~exec_sandbox.packages.layers`), from
which later sandboxes with the same lock boot, with their own L1 memory snapshots. The guest never
gets a network or a host credential for any of this.
"""

from __future__ import annotations

from exec_sandbox.packages.layers import LayerCache, LayerCacheStats, LayerEntry, LayerKeyInputs
from exec_sandbox.packages.lock import GuestTarget, LockedPackage, PackageLock, ProgressCallback, guest_target
from exec_sandbox.packages.request import PackageRequest, parse_packages

__all__ = [
    "GuestTarget",
    "LayerCache",
    "LayerCacheStats",
    "LayerEntry",
    "LayerKeyInputs",
    "LockedPackage",
    "PackageLock",
    "PackageRequest",
    "ProgressCallback",
    "guest_target",
    "parse_packages",
]
