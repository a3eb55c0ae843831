"""One guest VM (L1 of the sandbox): options and machine spec, :class:`SandboxVm`, code execution on it,
fork, and L1 memory snapshots.

Imports :mod:`exec_sandbox.client`, :mod:`exec_sandbox.storage`, :mod:`exec_sandbox.vm_manager` (images) and
the core modules; never :mod:`exec_sandbox.sandbox` or above.
"""
