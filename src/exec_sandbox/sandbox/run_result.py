"""``RunResult``: what ``Scheduler.run`` returns."""

from __future__ import annotations

from pydantic import Field

from exec_sandbox.egress.accounting import EgressLogEntry, EgressStats
from exec_sandbox.models import ExecutionResult
from exec_sandbox.packages.lock import PackageLock

__all__ = ["RunResult"]


class RunResult(ExecutionResult):
    """:class:`ExecutionResult` of ``Scheduler.run`` plus the files read back after the run.

    ``files`` maps each requested ``download`` path (as given) to its content; a path that could not
    be read (missing, a directory, larger than ``config.max_file_bytes``, ...) is absent from
    ``files`` and present in ``download_errors`` with the reason.
    """

    files: dict[str, bytes] = Field(default_factory=dict)
    download_errors: dict[str, str] = Field(default_factory=dict)
    # packages=: the exact lock installed (pass it as packages= to reproduce) and whether its L2
    # layer was already cached (False: this run resolved, installed and built it).
    packages: PackageLock | None = None
    packages_cache_hit: bool | None = None
    # Networked runs: every connection (or refused attempt) through the egress gateway, and totals.
    egress_log: list[EgressLogEntry] = Field(default_factory=list)
    egress_stats: EgressStats | None = None
