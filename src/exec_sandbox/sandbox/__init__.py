"""Policy over many VMs: the :class:`Scheduler`, sessions, the warm pool, admission control.

The public API's home; imports every layer below (vm, host, storage, client, protocol, core), never the CLI.
"""
