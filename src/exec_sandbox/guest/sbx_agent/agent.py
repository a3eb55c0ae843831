"""The agent: :class:`AgentCore` plus its request handlers (see :mod:`.dispatch` for the routing)."""

from __future__ import annotations

from .dispatch import DispatchOps
from .file_ops import FileOps
from .net_ops import NetOps
from .proc_ops import ProcOps
from .system_ops import SystemOps
from .watch_ops import WatchOps

__all__ = ["Agent"]


class Agent(SystemOps, ProcOps, WatchOps, FileOps, NetOps, DispatchOps):
    """The guest agent (see the package docstring)."""
