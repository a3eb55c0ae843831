"""VMM backends: one process each (Firecracker over its HTTP API, QEMU over QMP)."""
