"""qcow2 overlays: the long-lived qemu-storage-daemon (:mod:`.daemon`) and the pool of
pre-created overlays (:mod:`.overlay_pool`).

Imports only the core modules. ``exec_sandbox.qemu_storage_daemon`` and ``exec_sandbox.overlay_pool`` are
kept as re-export modules for older imports.
"""
