"""Load the guest agent (a stdlib-only package, not part of the host library) for unit tests."""

from __future__ import annotations

import importlib
from types import ModuleType

from exec_sandbox.protocol import agent as agent_protocol

__all__ = ["AGENT", "MODULES", "load_agent"]

#: The package directory; ``python3 AGENT ...`` runs the agent (its ``__main__``).
AGENT = agent_protocol.GUEST_AGENT_PATH
MODULES = ("wire", "transport", "procs", "cgroups", "repl", "disk", "core", "exec_ops", "repl_ops",
           "system_ops", "file_ops", "dispatch", "agent", "cli")


def load_agent(name: str) -> ModuleType:
    """Every module of the agent package flattened into one namespace, as the one-file agent was."""
    flat = ModuleType(name)
    for mod in MODULES:
        module = importlib.import_module(f"exec_sandbox.guest.sbx_agent.{mod}")
        for key, value in vars(module).items():
            if not key.startswith("__"):
                setattr(flat, key, value)
    return flat
