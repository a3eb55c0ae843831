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
``repl_ops`` <- ``system_ops``; ``file_ops``, ``dispatch`` (the request table) <- ``agent`` <-
``cli`` (options, ``main``) <- ``__main__``.

Containment: as the guest's PID 1, every exec runs in a cgroup v2 group of its own under
/sys/fs/cgroup/sbx (see :class:`.cgroups.Cgroups`), ended with ``cgroup.kill``; user code (uid
1000) cannot leave it. Elsewhere (tests on a host) the /proc-scanning ``kill_tree`` is the fallback.
"""
