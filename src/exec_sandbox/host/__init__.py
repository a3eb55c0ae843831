"""What the host has and how we hold it: memory/CPU capacity, cgroup limits and per-VM cgroups.

Imports only the core modules (and :mod:`smartvm`).
"""
