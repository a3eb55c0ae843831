"""Load the guest agent (a stdlib-only script, not a package module) as a module for unit tests."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from exec_sandbox.protocol import agent as agent_protocol

__all__ = ["AGENT", "load_agent"]

AGENT = agent_protocol.GUEST_AGENT_PATH


def load_agent(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
