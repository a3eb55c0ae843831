"""The agent's state and its plumbing: output queue, hello, process spawning, the main loop.

The request handlers live in the ``*_ops`` modules as mixins over :class:`AgentCore`;
:class:`sbx_agent.agent.Agent` puts them together and :mod:`.dispatch` routes frames to them.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from .cgroups import Cgroups
from .disk import grow_root_fs
from .procs import (
    STD_PATH,
    Proc,
    Reaper,
    Workers,
    harden,
    make_dev_links,
    no_new_privs,
    start_process,
    which,
)
from .wire import (
    AGENT_VERSION,
    BOOT_MONO,
    CAPABILITIES,
    LANG_EXT,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Args,
    Decoder,
    RequestError,
    encode_frame,
    trace,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .repl import Repl
    from .transport import Transport
    from .wire import Msg

EARLY_CANCELS = 256  # cancelled-before-registered request ids remembered


class AgentCore:
    """State shared by every handler mixin, and the helpers they all use."""

    if TYPE_CHECKING:  # implemented by the mixins (see agent.Agent); declared for the type checker
        def dispatch(self, msg: Msg) -> None: ...
        def ensure_spare(self, lang: str) -> None: ...
        def repl_for(self, lang: str) -> Repl: ...
        def resolve_dir(self, path: str) -> str: ...
        def _abort_upload(self, req_id: str, up: Msg, code: str, message: str, *,
                          reply: bool = True) -> None: ...

    def __init__(self, args: Args) -> None:
        self.args = args
        self.workdir = os.path.realpath(args.workdir)
        self.run_uid: int | None = args.run_as_uid
        self.run_gid: int | None = args.run_as_gid
        self.instance = os.urandom(8).hex()
        self.out: list[bytes] = []
        self.out_cond = threading.Condition()
        self.out_max = 256
        self.uploads: dict[str, Msg] = {}
        self.running: dict[str, Callable[[], None]] = {}  # request id -> cancel
        # Cancels that arrived before their request registered (a worker had not started it yet,
        # or it waited for a session lock): the last EARLY_CANCELS ids, oldest first.
        self.early_cancels: dict[str, None] = {}
        self.running_lock = threading.Lock()
        self.repls: dict[str, Repl] = {}
        self.repl_guard = threading.Lock()
        self.bg: dict[int, Any] = {}  # pid -> background process (see proc_ops.BgProc)
        self.bg_lock = threading.Lock()
        self.tracked: set[int] = set()
        self.tracked_lock = threading.Lock()
        self.spawn_lock = threading.Lock()
        self._nproc_set = False
        self.terminating = False
        # Spare interpreters: started ahead, consumed by exactly one one-shot exec each.
        self.spare_langs: set[str] = set(args.spare or [])
        self.spares: dict[str, Repl] = {}
        self.spare_starting: set[str] = set()
        self.spare_cond = threading.Condition()
        self.rng_epoch = 0  # bumped by every reseed_rng
        self.counter = 0
        self.counter_lock = threading.Lock()
        self._rundir: str | None = None
        self._reaper: Reaper | None = None
        self._reaper_lock = threading.Lock()
        self._interpreters: Msg | None = None
        self._cgroups: Cgroups | None = None
        self._cgroups_probed = False
        self.transport: Transport | None = None
        self.stop_event = threading.Event()
        self.workers = Workers()
        self.hardened = threading.Event()  # set once _harden ran (see _greet()): libc, /dev, disk
        self._harden_started = False

    # ---- lazily built pieces (kept off the boot critical path)

    @property
    def reaper(self) -> Reaper:
        # Locked: two threads creating it at once would start two reapers, which split the exit
        # statuses between them (a waiter on the discarded one never sees its child exit).
        with self._reaper_lock:
            if self._reaper is None:
                self._reaper = Reaper()
            return self._reaper

    @property
    def cgroups(self) -> Cgroups | None:
        with self._reaper_lock:
            if not self._cgroups_probed:
                self._cgroups = Cgroups.open()
                self._cgroups_probed = True
            return self._cgroups

    @property
    def interpreters(self) -> Msg:
        if self._interpreters is None:
            a = self.args
            sh = a.shell or which("sh")
            raw: list[str] | None = [sh] if sh else None
            busybox = which("busybox")
            if raw is None and busybox:
                raw = [busybox, "sh"]
            self._interpreters = {
                "python": a.python or which("python3") or sys.executable,
                "javascript": a.node or which("node") or which("nodejs"),
                "raw": raw,
            }
        return self._interpreters

    @property
    def rundir(self) -> str:
        if self._rundir is None:
            base = self.args.rundir or "/tmp"
            path = os.path.join(base, f"sbx-agent-{os.getpid()}-{self.instance[:6]}")
            os.makedirs(path, mode=0o711, exist_ok=True)
            os.chmod(path, 0o711)
            self._rundir = path
        return self._rundir

    def next_n(self) -> int:
        with self.counter_lock:
            self.counter += 1
            return self.counter

    # ---- cancellation (see DispatchOps.op_cancel)

    def register(self, req_id: str, cancel: Callable[[], None]) -> None:
        """Make ``req_id`` cancellable; a cancel that already arrived for it fires at once."""
        with self.running_lock:
            self.running[req_id] = cancel
            early = req_id in self.early_cancels
            self.early_cancels.pop(req_id, None)
        if early:
            cancel()

    def unregister(self, req_id: str) -> None:
        with self.running_lock:
            self.running.pop(req_id, None)

    def cancel_request(self, target: str) -> bool:
        """Cancel ``target``; True when it was running. An unknown id is remembered briefly."""
        with self.running_lock:
            cancel = self.running.get(target)
            if cancel is None:
                self.early_cancels[target] = None
                while len(self.early_cancels) > EARLY_CANCELS:
                    del self.early_cancels[next(iter(self.early_cancels))]
        if cancel is None:
            return False
        cancel()
        return True

    def take_early_cancel(self, req_id: str) -> bool:
        """True (once) when ``req_id`` was cancelled before it started: refuse to run it."""
        with self.running_lock:
            early = req_id in self.early_cancels
            self.early_cancels.pop(req_id, None)
            return early

    # ---- output queue (bounded: producers block, which back-pressures user processes)

    def send(self, msg: Msg) -> None:
        frame = encode_frame(msg)
        with self.out_cond:
            while len(self.out) >= self.out_max:
                self.out_cond.wait()
            self.out.append(frame)
            self.out_cond.notify_all()

    def _writer(self) -> None:
        assert self.transport is not None
        while True:
            with self.out_cond:
                while not self.out:
                    self.out_cond.wait()
                n, size = 0, 0
                while n < len(self.out) and (n == 0 or size + len(self.out[n]) <= 256 * 1024):
                    size += len(self.out[n])
                    n += 1
                batch = b"".join(self.out[:n])
                del self.out[:n]
                self.out_cond.notify_all()
            self.transport.send(batch)

    def flush_out(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.out_cond:
            while self.out and time.monotonic() < deadline:
                self.out_cond.wait(0.05)

    # ---- hello

    def hello(self, req_id: str | None) -> Msg:
        interp = self.interpreters
        try:
            with open("/proc/uptime") as fh:
                uptime = float(fh.read().split()[0])
        except (OSError, ValueError):
            uptime = None
        return {
            "type": "hello",
            "id": req_id,
            "agent_version": AGENT_VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "capabilities": CAPABILITIES,
            "languages": sorted(k for k, v in interp.items() if v),
            "instance": self.instance,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "workdir": self.workdir,
            "max_frame_bytes": MAX_FRAME_BYTES,
            "boot": {
                "uptime_s": uptime,
                "agent_uptime_s": round(time.monotonic() - BOOT_MONO, 6),
                "is_pid1": os.getpid() == 1,
                "warm": sorted(k for k, r in self.repls.items() if r.alive()),
                "spares": sorted(self.spares),
            },
        }

    # ---- process helpers

    def base_env(self, extra: Msg) -> Msg:
        home = self.args.home or self.workdir
        env = {
            "PATH": STD_PATH,
            "HOME": home,
            "USER": self.args.user_name,
            "LOGNAME": self.args.user_name,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": "/tmp",
            "PS1": "",
            "PS2": "",
        }
        env.update(extra)
        return env

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str, stdin: int,
              pass_fds: tuple[int, ...] = (), cgroup: str | None = None, as_root: bool = False,
              pty_slave: int = -1) -> Proc:
        """Start ``argv`` in a new session with stdout/stderr pipes, as the sandbox user if set.

        ``cgroup``: the child is born in that group (see :class:`Cgroups`). ``as_root``: as the
        agent's own user (a process the host asked to run as root). ``pty_slave``: the child's
        stdin/stdout/stderr and controlling terminal (see :func:`.ptys.start_pty_process`)."""
        uid = None if as_root else self.run_uid
        gid = self.run_gid if uid is not None else None
        if uid is not None:
            self._limit_user_processes()
        if self._harden_started:  # loading libc in the background (see _greet): wait for it
            self.hardened.wait(30)
        no_new_privs()
        with self.spawn_lock:
            if self.terminating:
                raise RequestError("terminating", "the agent is shutting down")
            cg = self.cgroups
            if cgroup is not None and cg is not None:
                # Forks inherit the parent's group: the agent steps into the exec's group for the
                # fork only. Nothing else in the agent forks (every fork holds spawn_lock).
                Cgroups.move(cgroup, os.getpid())
                try:
                    proc = self._start(argv, stdin, cwd, env, pass_fds, uid, gid, pty_slave)
                finally:
                    Cgroups.move(cg.home, os.getpid())
            else:
                proc = self._start(argv, stdin, cwd, env, pass_fds, uid, gid, pty_slave)
            with self.tracked_lock:
                self.tracked.add(proc.pid)
            self.reaper.notify_spawn()
        return proc

    @staticmethod
    def _start(argv: list[str], stdin: int, cwd: str, env: dict[str, str], pass_fds: tuple[int, ...],
               uid: int | None, gid: int | None, pty_slave: int) -> Proc:
        if pty_slave >= 0:
            from .ptys import start_pty_process

            return start_pty_process(argv, slave=pty_slave, cwd=cwd, env=env, uid=uid, gid=gid)
        return start_process(argv, stdin=stdin, cwd=cwd, env=env, pass_fds=pass_fds, uid=uid, gid=gid)

    def _limit_user_processes(self) -> None:
        # RLIMIT_NPROC is inherited and counted per uid: it caps everything the sandbox user runs
        # (fork bombs), while the root agent itself stays exempt.
        limit = self.args.max_user_processes
        if self._nproc_set or not limit:
            return
        import resource

        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
        except (ValueError, OSError):
            pass
        self._nproc_set = True

    def forget_pid(self, pid: int) -> None:
        with self.tracked_lock:
            self.tracked.discard(pid)

    def protected_pids(self) -> set[int]:
        # Other execs and REPLs spawned by the agent must survive one exec's tree kill.
        with self.tracked_lock:
            return set(self.tracked)

    def write_code_file(self, language: str, code: str) -> str:
        path = os.path.join(self.rundir, f"code-{self.next_n()}.{LANG_EXT[language]}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, code.encode())
        finally:
            os.close(fd)
        return path

    # ---- main loop

    def run(self, transport: Transport) -> None:
        decoder = Decoder()
        if self.transport is None:
            self.transport = transport
            transport.on_connect = self._greet
            threading.Thread(target=self._writer, name="writer", daemon=True).start()
            for lang in self.args.warm or []:
                threading.Thread(target=self._warm_quiet, args=(lang,), daemon=True).start()
            for lang in sorted(self.spare_langs):
                self.ensure_spare(lang)
        while not self.stop_event.is_set():
            data = transport.recv()
            if not data:
                # The host went away: a new host must not see half a frame or a half upload.
                decoder.reset()
                for req_id, up in list(self.uploads.items()):
                    self._abort_upload(req_id, up, "disconnected", "the host disconnected", reply=False)
                continue
            for msg in decoder.feed(data):
                self.dispatch(msg)

    def _harden(self) -> None:
        try:
            harden(subreaper=os.getpid() != 1)
            if os.getpid() == 1:
                make_dev_links()
                grow_root_fs()  # a no-op unless the host gave this VM a bigger disk than the image
        finally:
            self.hardened.set()

    def _greet(self) -> None:
        self.send(self.hello(None))
        trace("hello queued")
        if not self._harden_started:  # after the first hello: loading libc is off the boot path
            self._harden_started = True
            threading.Thread(target=self._harden, name="harden", daemon=True).start()

    def _warm_quiet(self, lang: str) -> None:
        try:
            self.repl_for(lang)
        except Exception:
            pass

