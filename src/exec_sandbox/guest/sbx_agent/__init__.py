"""exec_sandbox guest agent: runs inside the guest (stdlib only).

Copied into guest images at /opt/sbx/sbx_agent/ and started by init (``python3 -I -S`` importing
:mod:`sbx_agent.cli` from the image's precompiled .pyc files), so it is usually PID 1: it reaps
every orphan. It talks to the host over a virtio-serial port (or, for tests on the host, a unix
socket) with length-prefixed frames:

    b"SBX" + version byte (1) | u32 big-endian payload length | UTF-8 JSON object (<= 4 MiB)

The host module ``exec_sandbox.agent_protocol`` is the authoritative description of the messages.
virtio-serial semantics drive the design: writes block while no host is connected and reads see
EOF while the host is away, so the agent announces ``hello`` on start and on every detected
(re)connection, answers ``ping`` with ``hello`` and tags every reply with the request id.

Startup imports are kept minimal (this is on the VM boot critical path): no json, re, enum,
subprocess, signal or typing (see :mod:`.wire` and :func:`.procs.start_process`); exec machinery
is lazy.

Modules (imports point down): ``wire`` (constants, JSON via the C scanner, frames) <- ``transport``,
``procs`` (spawn, reaper, workers), ``cgroups`` (containment), ``disk`` <- ``repl`` (streams,
interpreters, ``drivers/``) <- ``core`` (state, output queue, spawn, main loop) <- ``exec_ops`` <-
``repl_ops`` <- ``system_ops``; ``proc_ops`` (background processes; ``ptys`` loaded on use),
``watch_ops`` (inotify), ``file_ops``, ``dispatch`` (the request table) <- ``agent`` <- ``cli``
(options, ``main``) <- ``__main__``.

Containment: as the guest's PID 1, every exec runs in a cgroup v2 group of its own under
/sys/fs/cgroup/sbx (see :class:`.cgroups.Cgroups`), ended with ``cgroup.kill``; user code (uid
1000) cannot leave it. Elsewhere (tests on a host) the /proc-scanning ``kill_tree`` is the fallback.
"""

import sys

#: Every module, dependencies first (the order :func:`_preload` executes them in).
MODULES = ("wire", "transport", "procs", "cgroups", "disk", "repl", "core", "exec_ops", "repl_ops",
           "system_ops", "proc_ops", "watch_ops", "file_ops", "dispatch", "agent", "cli")


def _preload() -> None:
    """Load the image's precompiled modules without the import machinery.

    importlib's own bytecode costs ~7 ms per module under TCG (finders, specs, loaders, stats),
    ~0.1 s for this package at every cold boot. The image's .pyc files are unchecked-hash ones
    (the builder's ``compileall --invalidation-mode unchecked-hash``): read, unmarshalled and run
    here in dependency order, each module's relative imports then find the earlier ones in
    ``sys.modules``. Anything else (timestamp .pyc files on a host, a missing file) leaves the rest
    to the normal import system.
    """
    import marshal

    magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
    base = __path__[0]
    tag = sys.implementation.cache_tag
    for name in MODULES:
        full = f"{__name__}.{name}"
        if full in sys.modules:
            continue
        try:
            with open(f"{base}/__pycache__/{name}.{tag}.pyc", "rb") as fh:
                data = fh.read()
        except OSError:
            return
        if data[:4] != magic or data[4:8] != b"\x01\x00\x00\x00":  # unchecked-hash pycs only
            return
        module = type(sys)(full)
        module.__file__ = f"{base}/{name}.py"
        module.__package__ = __name__
        sys.modules[full] = module
        try:
            exec(marshal.loads(data[16:]), module.__dict__)
        except BaseException:
            del sys.modules[full]
            raise
        globals()[name] = module


if sys.implementation.cache_tag is not None:
    _preload()
