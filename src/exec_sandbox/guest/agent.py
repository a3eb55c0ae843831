#!/usr/bin/python3
"""exec_sandbox guest agent: runs inside the guest (stdlib only, one file).

Copied into guest images at /opt/sbx/agent.py and exec'd by init, so it is usually PID 1: it reaps
every orphan. It talks to the host over a virtio-serial port (or, for tests on the host, a unix
socket) with length-prefixed frames:

    b"SBX" + version byte (1) | u32 big-endian payload length | UTF-8 JSON object (<= 4 MiB)

The host module ``exec_sandbox.agent_protocol`` is the authoritative description of the messages.
virtio-serial semantics drive the design: writes block while no host is connected and reads see
EOF while the host is away, so the agent announces ``hello`` on start and on every detected
(re)connection, answers ``ping`` with ``hello`` and tags every reply with the request id.

Startup imports are kept minimal (this is on the VM boot critical path); exec machinery is lazy.

Containment: as the guest's PID 1, every exec runs in a cgroup v2 group of its own under
/sys/fs/cgroup/sbx (see ``Cgroups``), ended with ``cgroup.kill``; user code (uid 1000) cannot
leave it. Elsewhere (tests on a host) the /proc-scanning ``kill_tree`` is the fallback.
"""

from __future__ import annotations

import os
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the guest must not pay for importing typing at boot
    from collections.abc import Callable
    from typing import Any

    Msg = dict[str, Any]

__all__ = ["main"]

AGENT_VERSION = "1.0.0"
PROTOCOL_VERSION = 1
MAGIC = b"SBX"
HEADER_LEN = 8
MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_PORT_NAME = "org.exec_sandbox.agent"
MAX_CODE_BYTES = 2 * 1024 * 1024
MAX_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_OUTPUT_CAP = 10 * 1024 * 1024
READ_CHUNK = 64 * 1024
CAPABILITIES = [
    "ping",
    "exec",
    "exec.session",
    "warmup",
    "write_file",
    "read_file",
    "list_files",
    "reseed_rng",
    "cancel",
    "shutdown",
]
LANG_EXT = {"python": "py", "javascript": "js", "raw": "sh"}
_BOOT_MONO = time.monotonic()
# Boot tracing (guest init sets SBX_TRACE for the kernel argument sbx.trace): /proc/uptime stamps of
# the agent's start-up on stderr, which is the console when the agent is PID 1. Off by default.
_TRACE = os.environ.get("SBX_TRACE") == "1"


def _trace(what: str) -> None:
    if _TRACE:
        try:
            with open("/proc/uptime") as fh:
                up = fh.read().split()[0]
        except OSError:
            up = "?"
        print(f"sbx-trace {up} agent: {what}", file=sys.stderr, flush=True)


class RequestError(Exception):
    """A request failed in a way reported to the host as an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- JSON
#
# The json package imports re (which imports enum) and compiles regexes at import: ~250 ms of every
# cold boot under TCG. Its C accelerator _json does the real work without either, so the agent
# drives it directly: json_dumps(x) == json.dumps(x, separators=(",", ":"), ensure_ascii=False),
# json_dumps(x, ascii=True) == json.dumps(x), and json_loads is json.loads (errors: ValueError).


class _ScanContext:
    """The attributes _json.make_scanner reads (those of a default json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


try:
    import _json

    _scan_once = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # it reads attributes

    def json_dumps(obj: object, *, ascii: bool = False) -> str:
        # A fresh encoder per call: its circular-reference memo is not reset after an error.
        encoder = _json.make_encoder({}, _not_serializable,
                                     _json.encode_basestring_ascii if ascii else _json.encode_basestring,
                                     None, ":" if not ascii else ": ", "," if not ascii else ", ",
                                     False, False, True)
        return "".join(encoder(obj, 0))

    def json_loads(text: str) -> object:
        n = len(text)
        i = 0
        while i < n and text[i] in " \t\n\r":
            i += 1
        try:
            obj, end = _scan_once(text, i)
        except StopIteration:
            raise ValueError("Expecting value") from None
        while end < n and text[end] in " \t\n\r":
            end += 1
        if end != n:
            raise ValueError("Extra data")
        return obj

except (ImportError, AttributeError):  # pragma: no cover - CPython always has _json
    import json as _json_mod

    def json_dumps(obj: object, *, ascii: bool = False) -> str:
        if ascii:
            return _json_mod.dumps(obj)
        return _json_mod.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    def json_loads(text: str) -> object:
        return _json_mod.loads(text)


# --------------------------------------------------------------------------- framing


def encode_frame(msg: Msg) -> bytes:
    payload = json_dumps(msg).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError("frame too large")
    return MAGIC + bytes([PROTOCOL_VERSION]) + len(payload).to_bytes(4, "big") + payload


class Decoder:
    """Incremental frame decoder that resynchronises on the magic after garbage."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def reset(self) -> None:
        self.buf.clear()

    def feed(self, data: bytes) -> list[Msg]:
        self.buf += data
        out: list[Msg] = []
        while True:
            if len(self.buf) < HEADER_LEN:
                if self.buf and not MAGIC.startswith(bytes(self.buf[:3])):
                    self._skip()
                    continue
                return out
            if self.buf[:3] != MAGIC or self.buf[3] != PROTOCOL_VERSION:
                self._skip()
                continue
            n = int.from_bytes(self.buf[4:8], "big")
            if n > MAX_FRAME_BYTES:
                self._skip()
                continue
            if len(self.buf) < HEADER_LEN + n:
                return out
            payload = bytes(self.buf[HEADER_LEN : HEADER_LEN + n])
            del self.buf[: HEADER_LEN + n]
            try:
                msg = json_loads(payload.decode("utf-8", "surrogatepass"))
            except (ValueError, RecursionError):
                msg = None
            if not isinstance(msg, dict):
                out.append({"type": "__invalid__", "id": None})
            else:
                out.append(msg)

    def _skip(self) -> None:
        # Drop one byte, then everything up to the next possible magic.
        idx = self.buf.find(MAGIC, 1)
        del self.buf[: idx if idx > 0 else max(1, len(self.buf) - 2)]


# --------------------------------------------------------------------------- transports


class Transport:
    """Blocking byte channel that survives host disconnects."""

    on_connect: object = None  # callable() invoked when a (new) host connection is detected

    def recv(self) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def send(self, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _connected(self) -> None:
        if callable(self.on_connect):
            self.on_connect()


class VirtioTransport(Transport):
    """The virtio-serial port: reads see EOF while no host is connected, writes block.

    While the host is away the agent waits for it without reading: ``poll`` reports POLLHUP until
    the host connects, and the guest kernel raises SIGIO on the port's owner when the host
    (dis)connects (O_ASYNC), which wakes the wait at once. That matters after a snapshot restore:
    the restored guest sees the old host leave and the new one arrive within milliseconds, and the
    agent must greet it immediately instead of at the next tick of a backoff timer. Without SIGIO
    (another kernel, or not the main thread) the wait falls back to a short capped backoff.
    """

    def __init__(self, port_name: str, device: str | None) -> None:
        self.path = device or self._find(port_name)
        self.fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self.connected = False
        self.wlock = threading.Lock()
        self.wake_r = -1
        self._arm_sigio()

    def _arm_sigio(self) -> None:
        # _signal, not signal: the wrapper imports enum and builds IntEnums, costly at boot under TCG.
        signal: Any = __import__("_signal")

        if threading.current_thread() is not threading.main_thread():
            return
        try:
            r, w = os.pipe()
            for fd in (r, w):
                os.set_blocking(fd, False)
                os.set_inheritable(fd, False)
            # The handler does nothing: Python's C-level handler writes to the wakeup fd, which the
            # disconnected wait selects on. Installed before O_ASYNC so SIGIO can never kill PID 1.
            signal.signal(signal.SIGIO, lambda _sig, _frame: None)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            self.wake_r = r
        except (OSError, ValueError, AttributeError):
            self.wake_r = -1

    def _set_async(self, on: bool) -> None:
        # SIGIO only while the host is away: when connected it would fire for every incoming chunk.
        if self.wake_r < 0:
            return
        import fcntl

        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            want = flags | os.O_ASYNC if on else flags & ~os.O_ASYNC
            if want != flags:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, want)
        except OSError:
            pass

    def _host_present(self) -> bool:
        import select

        p = select.poll()
        p.register(self.fd, select.POLLIN)
        events = p.poll(0)
        return not any(ev & select.POLLHUP for _fd, ev in events)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 256):
                pass
        except OSError:
            pass

    @staticmethod
    def _find(port_name: str) -> str:
        # Wait as long as it takes (as PID 1, exiting would panic the kernel), but say so once.
        warn_at: float | None = time.monotonic() + 5.0
        while True:
            base = "/sys/class/virtio-ports"
            try:
                entries = sorted(os.listdir(base))
            except OSError:
                entries = []
            for entry in entries:
                try:
                    with open(f"{base}/{entry}/name") as fh:
                        name = fh.read().strip()
                except OSError:
                    continue
                if name == port_name:
                    dev = f"/dev/{entry}"
                    if not os.path.exists(dev):
                        _mknod_from_sysfs(f"{base}/{entry}/dev", dev)
                    return dev
            if warn_at is not None and time.monotonic() > warn_at:
                print(f"sbx-agent: still waiting for virtio port {port_name!r}", file=sys.stderr, flush=True)
                warn_at = None
            time.sleep(0.01 if warn_at is not None else 0.2)

    def recv(self) -> bytes:
        delay = 0.001
        while True:
            if self.connected:
                data = os.read(self.fd, READ_CHUNK)
                if data:
                    return data
                # EOF: the host left (or a restored guest sees its snapshot-time host go away).
                self.connected = False
                self._set_async(True)
                return b""
            if self.wake_r >= 0:
                self._set_async(True)
                self._drain_wake()  # before the check: a SIGIO from here on wakes the wait below
            if self._host_present():
                self.connected = True
                self._set_async(False)
                self._connected()
                continue
            if self.wake_r >= 0:
                import select

                # SIGIO announces the host: the timeout is only a safety net (never spin, never hang).
                select.select([self.wake_r], [], [], delay)
                delay = min(delay * 2, 0.5)
            else:
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        with self.wlock:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]


def _mknod_from_sysfs(dev_attr: str, path: str) -> None:
    import stat

    with open(dev_attr) as fh:
        major, minor = (int(x) for x in fh.read().strip().split(":"))
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))


class UnixTransport(Transport):
    """Unix socket transport for running the agent on the host in tests (connect or listen)."""

    def __init__(self, path: str, listen: bool) -> None:
        import socket

        self._socket_mod = socket
        self.path = path
        self.listen = listen
        self.sock: Any = None
        self.cond = threading.Condition()
        self.server: Any = None
        if listen:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(path)
            self.server.listen(4)

    def _establish(self) -> None:
        socket = self._socket_mod
        if self.listen:
            assert self.server is not None
            conn, _ = self.server.accept()
        else:
            delay = 0.01
            while True:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    conn.connect(self.path)
                    break
                except OSError:
                    conn.close()
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
        with self.cond:
            self.sock = conn
            self.cond.notify_all()
        self._connected()

    def recv(self) -> bytes:
        while True:
            if self.sock is None:
                self._establish()
            sock = self.sock
            try:
                data: bytes = sock.recv(READ_CHUNK)
            except OSError:
                data = b""
            if data:
                return data
            with self.cond:
                if self.sock is sock:
                    self.sock = None
            try:
                sock.close()
            except OSError:
                pass
            if not self.listen:
                time.sleep(0.05)
            return b""

    def send(self, data: bytes) -> None:
        with self.cond:
            while self.sock is None:
                self.cond.wait()
            sock = self.sock
        try:
            sock.sendall(data)
        except OSError:
            pass  # the host went away mid-frame; a new host must not see the tail


# --------------------------------------------------------------------------- reaper


# --------------------------------------------------------------------------- processes

DEVNULL = -3  # stdin of start_process: /dev/null (the value of subprocess.DEVNULL)


class Proc:
    """A started child: its pid, the read ends of its stdout/stderr pipes, and (once the agent
    reaped it) its wait status in ``returncode``."""

    def __init__(self, pid: int, stdout: Any, stderr: Any, popen: Any = None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self._popen = popen
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @returncode.setter
    def returncode(self, value: int | None) -> None:
        self._returncode = value
        if self._popen is not None:  # a reaped Popen must not try to reap (or warn) again
            self._popen.returncode = value


def start_process(argv: list[str], *, stdin: int, cwd: str, env: dict[str, str],
                  pass_fds: tuple[int, ...] = (), uid: int | None = None, gid: int | None = None) -> Proc:
    """What ``subprocess.Popen(argv, stdin=stdin, stdout=PIPE, stderr=PIPE, cwd=cwd, env=env,
    start_new_session=True, close_fds=True, pass_fds=pass_fds, umask=0o022, user=uid, group=gid,
    extra_groups=[] if uid is not None else None)`` does, without importing subprocess.

    subprocess imports signal, selectors, locale, contextlib and warnings (signal builds IntEnums):
    ~0.2 s of a cold VM's first exec under TCG. On CPython 3.11 the same C helper Popen uses
    (_posixsubprocess.fork_exec, 3.11 signature) is called directly; elsewhere Popen is used.
    """
    if sys.version_info[:2] != (3, 11):
        import subprocess

        extra: dict[str, Any] = {}
        if uid is not None:
            extra = {"user": uid, "group": gid, "extra_groups": []}
        popen = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                 env=env, start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                 umask=0o022, **extra)
        return Proc(popen.pid, popen.stdout, popen.stderr, popen)
    import _posixsubprocess

    env_list = []
    for k, v in env.items():
        kb = os.fsencode(k)
        if b"=" in kb:
            raise ValueError("illegal environment variable name")
        env_list.append(kb + b"=" + os.fsencode(v))
    exe = os.fsencode(argv[0])
    if os.path.dirname(exe):
        executables: tuple[bytes, ...] = (exe,)
    else:
        executables = tuple(os.path.join(os.fsencode(d), exe) for d in os.get_exec_path(env))
    opened: list[int] = []
    try:
        if stdin == DEVNULL:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(stdin)
        out_r, out_w = os.pipe()
        opened += [out_r, out_w]
        err_r, err_w = os.pipe()
        opened += [err_r, err_w]
        errpipe_r, errpipe_w = os.pipe()
        opened += [errpipe_r, errpipe_w]
        pid = _posixsubprocess.fork_exec(
            argv, executables, True, tuple(sorted({*map(int, pass_fds), errpipe_w})), cwd, env_list,
            stdin, -1, out_r, out_w, err_r, err_w, errpipe_r, errpipe_w,
            True, True, -1,  # restore_signals, start_new_session, process_group
            gid, [] if uid is not None else None, uid, 0o022,
            None, True,  # type: ignore[arg-type]  # preexec_fn None is what Popen passes; allow_vfork
        )
        for fd in (stdin if stdin in opened else -1, out_w, err_w, errpipe_w):
            if fd >= 0:
                os.close(fd)
                opened.remove(fd)
        failure = bytearray()
        while True:  # EOF without data: the exec succeeded (the pipe is close-on-exec)
            part = os.read(errpipe_r, 50000)
            failure += part
            if not part or len(failure) > 50000:
                break
        os.close(errpipe_r)
        opened.remove(errpipe_r)
        if failure:
            _raise_child_failure(bytes(failure), argv[0], cwd)
        opened.clear()
        return Proc(pid, open(out_r, "rb", buffering=0), open(err_r, "rb", buffering=0))
    finally:
        for fd in opened:
            os.close(fd)


def _raise_child_failure(data: bytes, program: str, cwd: str) -> None:
    # _posixsubprocess writes "ExceptionName:hex errno:message"; "noexec:chdir" names the cwd.
    # The child has exited (status 255); the reaper collects it like any other child.
    try:
        name, hex_errno, message = data.split(b":", 2)
        errno_ = int(hex_errno, 16)
        text = message.decode(errors="replace")
    except ValueError:
        name, errno_, text = b"SubprocessError", 0, f"bad exception data from child: {data!r}"
    if name == b"OSError" and errno_:
        if text == "noexec:chdir":
            raise OSError(errno_, os.strerror(errno_), cwd)
        if text == "noexec":
            raise OSError(errno_, os.strerror(errno_))
        raise OSError(errno_, os.strerror(errno_), program)
    raise OSError(0, f"{name.decode(errors='replace')}: {text}")



class Workers:
    """Threads that run requests, kept for the next one: starting a thread costs ~5-15 ms in a TCG
    guest, handing a job to a waiting one ~1 ms. Grows to the peak number of concurrent requests
    (an exec that runs for an hour holds its thread); idle threads just wait."""

    def __init__(self) -> None:
        self.jobs: Any = __import__("_queue").SimpleQueue()  # the C queue: no `queue` import at boot
        self.lock = threading.Lock()
        self.idle = 0  # waiting threads not yet promised a job

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self.lock:
            if self.idle > 0:
                self.idle -= 1  # promised: the job below is theirs
                self.jobs.put((fn, args))
                return
        threading.Thread(target=self._run, args=(fn, args), daemon=True).start()

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        while True:
            try:
                fn(*args)
            except BaseException:  # the job reports its own errors; the thread must survive
                pass
            with self.lock:
                self.idle += 1
            fn, args = self.jobs.get()


class Reaper:
    """Reaps every child (and, as PID 1 or subreaper, every orphan); waiters look statuses up."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.status: dict[int, int] = {}
        self.spawned = threading.Event()
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.spawned.clear()
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self.spawned.wait(1.0)
                continue
            except InterruptedError:
                continue
            with self.cond:
                self.status[pid] = status
                # Orphans nobody waits for would pile up here; forget the oldest.
                while len(self.status) > 4096:
                    del self.status[next(iter(self.status))]
                self.cond.notify_all()

    def notify_spawn(self) -> None:
        self.spawned.set()

    def wait(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while pid not in self.status:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.cond.wait(remaining)
            return self.status.pop(pid)

    def poll(self, pid: int) -> int | None:
        with self.cond:
            return self.status.pop(pid, None)

    def forget(self, pid: int) -> None:
        with self.cond:
            self.status.pop(pid, None)


def exit_code_of(status: int) -> tuple[int, int | None]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), None


# --------------------------------------------------------------------------- process tree kill


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, sid) of ``pid`` from /proc, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        fields = raw[raw.rindex(b")") + 2 :].split()
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def _proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def kill_tree(
    root_pid: int,
    protected_fn: Callable[[], set[int]],
    run_uid: int | None,
    spawn_lock: threading.Lock | None = None,
) -> None:
    """SIGKILL everything in ``root_pid``'s session/group/descendants, repeatedly, until none is left.

    User code may setsid()/setpgid() to escape its group; descendants are found through /proc, and
    orphans re-parented to the agent (PID 1 or subreaper) that run as the sandbox uid are included.
    Processes the agent spawned for other requests (``protected_fn()``) are spared; ``spawn_lock``
    keeps a concurrent spawn from looking like an orphan while it is being registered.
    """
    sigkill = 9  # not signal.SIGKILL: the signal module imports enum (~0.1 s under TCG)
    me = os.getpid()
    for _ in range(50):
        if spawn_lock is not None:
            with spawn_lock:
                if _kill_round(root_pid, protected_fn() - {root_pid}, run_uid, me, sigkill):
                    return
        elif _kill_round(root_pid, protected_fn() - {root_pid}, run_uid, me, sigkill):
            return
        time.sleep(0.01)


def _kill_round(root_pid: int, protected: set[int], run_uid: int | None, me: int, sig: int) -> bool:
    """One scan-and-kill pass; True when nothing of the tree is left alive."""
    try:
        os.killpg(root_pid, sig)
    except OSError:
        pass
    table: dict[int, tuple[int, int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if name.isdigit():
            info = _proc_stat(int(name))
            if info is not None:
                table[int(name)] = info
    victims: set[int] = set()
    for pid, (ppid, pgid, sid) in table.items():
        if pid in protected or pid == me:
            continue
        # Only the agent's own children can be orphans; their owner is looked up for those alone
        # (one stat per process would double the scan, which runs after every one-shot exec).
        if root_pid in (pid, pgid, sid) or (
            ppid == me and run_uid is not None and run_uid != 0 and _proc_uid(pid) == run_uid
        ):
            victims.add(pid)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _pg, _sid) in table.items():
            if ppid in victims and pid not in victims and pid not in protected and pid != me:
                victims.add(pid)
                changed = True
    alive = [p for p in victims if _is_alive(p)]
    for pid in alive:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return not alive


class Cgroups:
    """One cgroup v2 group per exec under ``/sys/fs/cgroup/sbx`` (the agent as root only).

    A process cannot leave its cgroup without write access to the ``cgroup.procs`` of the groups
    involved, and every group here is made by root (files 0644 root): double-forking, ``setsid``
    and re-parenting change nothing, so ``cgroup.kill`` (Linux >= 5.14; it also catches processes
    forked while it runs) ends everything an exec started. Children are born in their group:
    :meth:`Agent.spawn` moves the agent itself into the group, forks, and moves back, under the
    spawn lock (only spawns fork in the agent), so no user instruction runs outside it.
    ``kill_tree`` (process group/session/descendants) stays the fallback without cgroups (the
    agent run on a host for tests, an old kernel).
    """

    def __init__(self, base: str, home: str) -> None:
        self.base = base  # .../sbx
        self.home = home  # the agent's own group (the cgroup2 root)
        self.n = 0
        self.lock = threading.Lock()
        self.stale: list[str] = []  # groups whose rmdir failed (still emptying); retried later

    @classmethod
    def open(cls, mount: str = "/sys/fs/cgroup") -> Cgroups | None:
        # Only as the guest's PID 1: an agent run on a host (tests) must not touch the host's cgroups.
        if os.getpid() != 1 or os.geteuid() != 0:
            return None
        base = os.path.join(mount, "sbx")
        try:
            try:
                os.mkdir(base, 0o755)
            except FileExistsError:
                pass
            st = os.lstat(base)
            if st.st_uid != 0 or not os.path.exists(os.path.join(base, "cgroup.kill")):
                return None
            with open("/proc/self/cgroup") as fh:
                rel = fh.read().strip().partition("::")[2] or "/"
        except OSError:
            return None
        return cls(base, os.path.normpath(mount + rel))

    def create(self, kind: str) -> str:
        with self.lock:
            self.n += 1
            path = os.path.join(self.base, f"{kind}-{self.n}")
        os.mkdir(path, 0o755)
        return path

    @staticmethod
    def move(path: str, pid: int) -> None:
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)

    @staticmethod
    def pids(path: str) -> list[int]:
        try:
            with open(os.path.join(path, "cgroup.procs"), "rb") as fh:
                return [int(x) for x in fh.read().split()]
        except (OSError, ValueError):
            return []

    @staticmethod
    def populated(path: str) -> bool:
        try:
            with open(os.path.join(path, "cgroup.events"), "rb") as fh:
                return b"populated 1" in fh.read()
        except OSError:
            return False

    def kill(self, path: str, timeout: float = 5.0) -> bool:
        """SIGKILL every process in ``path`` (and in forks made meanwhile), wait until it is empty
        and remove it. True when it emptied in time."""
        try:
            fd = os.open(os.path.join(path, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            os.write(fd, b"1")
        except OSError:
            pass
        finally:
            os.close(fd)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.populated(path):
            if time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        empty = not self.populated(path)
        self.remove(path)
        return empty

    def kill_others(self, path: str, keep: int) -> None:
        """SIGKILL every process in ``path`` except ``keep`` (a session's interpreter at rest)."""
        for _ in range(50):
            victims = [p for p in self.pids(path) if p != keep]
            if not victims:
                return
            for pid in victims:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            time.sleep(0.002)

    def remove(self, path: str) -> None:
        with self.lock:
            todo, self.stale = [*self.stale, path], []
        left = []
        for p in todo:
            try:
                os.rmdir(p)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(p)
        if left:
            with self.lock:
                self.stale += left[-256:]


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        return raw[raw.rindex(b")") + 2 :][:1] not in (b"Z", b"X")
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- REPL drivers

PY_DRIVER = r"""
import os, sys
def _sbx_main():
    import linecache, traceback
    fin = int(os.environ.pop('SBX_REPL_IN')); fout = int(os.environ.pop('SBX_REPL_OUT'))
    g = {'__name__': '__main__', '__builtins__': __builtins__}
    n = 0
    def readn(k):
        parts = []
        while k:
            b = os.read(fin, min(k, 1 << 20))
            if not b:
                os._exit(0)
            parts.append(b); k -= len(b)
        return b''.join(parts)
    while True:
        line = b''
        while not line.endswith(b'\n'):
            b = os.read(fin, 1)
            if not b:
                os._exit(0)
            line += b
        if line[:1] == b'r':
            # Reseed before this block (the agent asks after a snapshot restore): no compile, no
            # extra round trip, and the user's line numbers stay as written.
            line = line[1:]
            m = sys.modules
            if 'random' in m:
                m['random'].seed()
            if 'tempfile' in m:
                m['tempfile']._name_sequence = None
        code = readn(int(line)).decode('utf-8', 'replace')
        n += 1
        name = '<session-%d>' % n
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        rc = 0
        try:
            exec(compile(code, name, 'exec'), g)
        except SystemExit as e:
            c = e.code
            if c is None:
                rc = 0
            elif isinstance(c, int):
                rc = c & 0xFF
            else:
                print(c, file=sys.stderr); rc = 1
        except BaseException as e:
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            traceback.print_exception(type(e), e, tb); rc = 1
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os.write(fout, b'%d\n' % rc)
_sbx_main()
"""

RND_ADD_ENTROPY = 0x40085203
RND_RESEED_CRNG = 0x5207


def _decode_seed(value: object) -> bytes:
    import binascii

    if not isinstance(value, str):
        raise RequestError("invalid_request", "seed must be base64")
    try:
        seed = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, TypeError):
        raise RequestError("invalid_request", "seed must be base64") from None
    if not 16 <= len(seed) <= 4096:
        raise RequestError("invalid_request", "seed must be 16..4096 bytes")
    return seed


def _prime_reseed() -> None:
    import binascii  # noqa: F401
    import fcntl  # noqa: F401
    import select  # noqa: F401


def _reseed_kernel(seed: bytes) -> int:
    """Mix ``seed`` into the kernel pool, credit it and force a CRNG reseed (root); bits credited."""
    credited = 0
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, seed)
        if os.geteuid() == 0:
            import fcntl

            try:
                fcntl.ioctl(fd, RND_ADD_ENTROPY,
                            (len(seed) * 8).to_bytes(4, sys.byteorder) + len(seed).to_bytes(4, sys.byteorder)
                            + seed)
                credited = len(seed) * 8
            except OSError:
                credited = 0
            try:
                fcntl.ioctl(fd, RND_RESEED_CRNG)
            except OSError:
                pass
    finally:
        os.close(fd)
    return credited


BOOT_ID_FILE = "/etc/sbx-boot-id"  # bind-mounted over /proc/sys/kernel/random/boot_id by the guest init
MACHINE_ID_FILE = "/etc/machine-id"


def _regenerate_identity() -> list[str]:
    """A clone's own identity (PID 1 in the guest only; call after the CRNG reseed): a fresh boot_id
    (the file bind-mounted over the kernel's read-only one) and machine-id, and the next PID moved to
    a random point of pid_max (``ns_last_pid``, CONFIG_CHECKPOINT_RESTORE). Returns what changed."""
    if os.getpid() != 1:
        return []
    done = []
    for path, dashes in ((BOOT_ID_FILE, True), (MACHINE_ID_FILE, False)):
        try:
            with open("/proc/sys/kernel/random/uuid", "rb") as fh:
                value = fh.read().strip()
            if not dashes:
                value = value.replace(b"-", b"")
            # In place, same length as what the init wrote: no new block, even on a full disk.
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.pwrite(fd, value + b"\n", 0)
            finally:
                os.close(fd)
            done.append(path)
        except OSError:
            pass
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as fh:
            pid_max = int(fh.read())
        span = max(pid_max - 2000, 1)
        nxt = 1000 + int.from_bytes(os.urandom(4), "big") % span
        fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(nxt).encode())
        finally:
            os.close(fd)
        done.append("ns_last_pid")
    except (OSError, ValueError):
        pass
    return done


JS_DRIVER = r"""
'use strict';
const vm = require('vm'); const fs = require('fs'); const net = require('net');
const inFd = +process.env.SBX_REPL_IN, outFd = +process.env.SBX_REPL_OUT;
delete process.env.SBX_REPL_IN; delete process.env.SBX_REPL_OUT;
const sandbox = {console, require, process, Buffer, setTimeout, clearTimeout, setInterval, clearInterval,
  setImmediate, clearImmediate, URL, URLSearchParams, TextEncoder, TextDecoder, queueMicrotask,
  structuredClone, module: {exports: {}}, __dirname: process.cwd(), __filename: '<session>'};
const ctx = vm.createContext(sandbox);
const report = (e) => {
  try { process.stderr.write((e && e.stack ? e.stack : String(e)) + '\n'); } catch (_) {}
};
process.on('uncaughtException', report); process.on('unhandledRejection', report);
let buf = Buffer.alloc(0); let busy = false; const queue = []; let n = 0;
async function pump() {
  if (busy) return; busy = true;
  while (queue.length) {
    const code = queue.shift(); let rc = 0; n += 1;
    try {
      const r = vm.runInContext(code, ctx, {filename: '<session-' + n + '>'});
      if (r && typeof r.then === 'function') await r;
    } catch (e) { report(e); rc = 1; }
    fs.writeSync(outFd, rc + '\n');
  }
  busy = false;
}
const input = new net.Socket({fd: inFd, readable: true, writable: false});
input.on('data', (d) => {
  buf = Buffer.concat([buf, d]);
  for (;;) {
    const nl = buf.indexOf(10); if (nl < 0) break;
    const len = parseInt(buf.subarray(0, nl).toString(), 10);
    if (buf.length < nl + 1 + len) break;
    queue.push(buf.subarray(nl + 1, nl + 1 + len).toString('utf8'));
    buf = buf.subarray(nl + 1 + len);
  }
  pump();
});
input.on('end', () => process.exit(0));
"""


# --------------------------------------------------------------------------- output forwarding


class Stream:
    """One output stream of one exec: cap, UTF-8 incremental decoding, byte counting."""

    def __init__(self, agent: Agent, req_id: str, name: str, cap: int) -> None:
        import codecs

        self.agent, self.req_id, self.name, self.cap = agent, req_id, name, cap
        self.total = 0
        self.forwarded = 0
        self.truncated = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - self.forwarded
        if room <= 0:
            self.truncated = self.truncated or bool(data)
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.forwarded += len(data)
        text = self.decoder.decode(data)
        if text:
            self.agent.send({"type": "output", "id": self.req_id, "stream": self.name, "data": text})

    def note(self, text: str) -> None:
        """An agent-authored line (timeouts, resets): not counted against the cap."""
        self.flush()
        self.agent.send({"type": "output", "id": self.req_id, "stream": self.name, "data": text})

    def flush(self) -> None:
        text = self.decoder.decode(b"", final=True)
        if text:
            self.agent.send({"type": "output", "id": self.req_id, "stream": self.name, "data": text})


# --------------------------------------------------------------------------- REPL sessions


class Repl:
    """A persistent interpreter for one language; blocks are run one at a time."""

    def __init__(self, agent: Agent, language: str) -> None:
        self.agent = agent
        self.language = language
        self.lock = threading.Lock()
        self.proc: Proc | None = None
        self.pending_file: str | None = None
        self.status_buf = b""
        self.ctl_w = -1
        self.status_r = -1
        self.reseed_pending = False  # python: reseed its PRNG before running the next block
        self.cg: str | None = None  # the interpreter's own cgroup (its home between blocks)
        self.exec_cg: str | None = None  # a session block's cgroup while the block runs

    def alive(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        agent = self.agent
        code_r, code_w = os.pipe()
        status_r, status_w = os.pipe()
        env = agent.base_env({})
        env["SBX_REPL_IN"] = str(code_r)
        env["SBX_REPL_OUT"] = str(status_w)
        stdin = DEVNULL
        if self.language == "python":
            argv = [agent.interpreters["python"], "-u", "-c", PY_DRIVER]
        elif self.language == "javascript":
            argv = [agent.interpreters["javascript"], "-e", JS_DRIVER]
        else:
            # dash: commands come on stdin; "command ." keeps syntax errors from killing the shell.
            argv = [*agent.interpreters["raw"], "-s"]
            stdin = code_r
        if agent.run_uid is not None:
            # The shell re-opens the status pipe through /proc, which checks the pipe inode's owner.
            os.fchown(status_w, agent.run_uid, agent.run_gid if agent.run_gid is not None else -1)
        cgroups = agent.cgroups
        self.cg = cgroups.create("repl") if cgroups is not None else None
        try:
            proc = agent.spawn(argv, env=env, cwd=agent.workdir, stdin=stdin, pass_fds=(code_r, status_w),
                               cgroup=self.cg)
        except BaseException:
            if self.cg is not None and cgroups is not None:
                cgroups.kill(self.cg)
                self.cg = None
            raise
        finally:
            os.close(code_r)
            os.close(status_w)
        assert proc.stdout is not None and proc.stderr is not None
        for fd in (proc.stdout.fileno(), proc.stderr.fileno(), status_r):
            os.set_blocking(fd, False)
        self.proc, self.ctl_w, self.status_r = proc, code_w, status_r
        self.status_buf = b""
        if self.language == "raw":
            self._send_raw_prologue(status_w)

    def _send_raw_prologue(self, status_w: int) -> None:
        # dash only parses single-digit fds, so re-open the status pipe as fd 9 through /proc.
        os.write(self.ctl_w, f"exec 9>/proc/self/fd/{status_w}\n".encode())

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        cgroups = self.agent.cgroups
        if cgroups is not None and self.cg is not None:
            for cg in (self.exec_cg, self.cg):
                if cg is not None:
                    cgroups.kill(cg)
            self.exec_cg = self.cg = None
        else:
            kill_tree(proc.pid, self.agent.protected_pids, self.agent.run_uid, self.agent.spawn_lock)
        if proc.returncode is None:
            status = self.agent.reaper.wait(proc.pid, 5.0)
            proc.returncode = status if status is not None else -9
        for fd in (self.ctl_w, self.status_r):
            try:
                os.close(fd)
            except OSError:
                pass
        for f in (proc.stdout, proc.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self.agent.forget_pid(proc.pid)

    def submit(self, code: str) -> None:
        data = code.encode()
        if self.language == "raw":
            path = self.agent.write_code_file("raw", code)
            self.pending_file = path
            line = f"command . '{path}' </dev/null\nprintf '%s\\n' \"$?\" >&9\n".encode()
            self._write_all(line)
        else:
            self.pending_file = None
            mark = b""
            if self.reseed_pending and self.language == "python":
                self.reseed_pending = False
                mark = b"r"
            self._write_all(mark + str(len(data)).encode() + b"\n" + data)

    def _write_all(self, data: bytes) -> None:
        # The caller holds the lock of an idle interpreter, which has consumed every earlier block:
        # a block that fits the (empty) pipe is written at once, without a thread.
        if len(data) <= 4096:
            try:
                n = os.write(self.ctl_w, data)
            except OSError:
                return
            data = data[n:]
            if not data:
                return

        # Bigger ones from a helper thread: a huge block must not block output pumping.
        def writer() -> None:
            view = memoryview(data)
            fd = self.ctl_w
            import select

            while view:
                try:
                    n = os.write(fd, view)
                    view = view[n:]
                except BlockingIOError:
                    select.select([], [fd], [], 1.0)
                except OSError:
                    return

        threading.Thread(target=writer, daemon=True).start()

    def read_status(self) -> int | None:
        try:
            chunk = os.read(self.status_r, 64)
        except BlockingIOError:
            return None
        if not chunk:
            raise EOFError
        self.status_buf += chunk
        if b"\n" in self.status_buf:
            line, self.status_buf = self.status_buf.split(b"\n", 1)
            try:
                return int(line.strip())
            except ValueError:
                return 1
        return None


# --------------------------------------------------------------------------- the agent


class Agent:
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
        self.repls: dict[str, Repl] = {}
        self.repl_guard = threading.Lock()
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
            sh = a.shell or _which("sh")
            raw: list[str] | None = [sh] if sh else None
            busybox = _which("busybox")
            if raw is None and busybox:
                raw = [busybox, "sh"]
            self._interpreters = {
                "python": a.python or _which("python3") or sys.executable,
                "javascript": a.node or _which("node") or _which("nodejs"),
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
                "agent_uptime_s": round(time.monotonic() - _BOOT_MONO, 6),
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
              pass_fds: tuple[int, ...] = (), cgroup: str | None = None) -> Proc:
        """Start ``argv`` in a new session with stdout/stderr pipes, as the sandbox user if set.

        ``cgroup``: the child is born in that group (see :class:`Cgroups`)."""
        if self.run_uid is not None:
            self._limit_user_processes()
        with self.spawn_lock:
            if self.terminating:
                raise RequestError("terminating", "the agent is shutting down")
            cg = self.cgroups
            if cgroup is not None and cg is not None:
                # Forks inherit the parent's group: the agent steps into the exec's group for the
                # fork only. Nothing else in the agent forks (every fork holds spawn_lock).
                Cgroups.move(cgroup, os.getpid())
                try:
                    proc = start_process(argv, stdin=stdin, cwd=cwd, env=env, pass_fds=pass_fds,
                                         uid=self.run_uid,
                                         gid=self.run_gid if self.run_uid is not None else None)
                finally:
                    Cgroups.move(cg.home, os.getpid())
            else:
                proc = start_process(argv, stdin=stdin, cwd=cwd, env=env, pass_fds=pass_fds,
                                     uid=self.run_uid, gid=self.run_gid if self.run_uid is not None else None)
            with self.tracked_lock:
                self.tracked.add(proc.pid)
            self.reaper.notify_spawn()
        return proc

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
            if os.getpid() != 1:
                threading.Thread(target=_become_subreaper, daemon=True).start()
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

    def _greet(self) -> None:
        self.send(self.hello(None))
        _trace("hello queued")

    def _warm_quiet(self, lang: str) -> None:
        try:
            self.repl_for(lang)
        except Exception:
            pass

    def dispatch(self, msg: Msg) -> None:
        req_id = msg.get("id")
        kind = msg.get("type")
        if not isinstance(req_id, str) or not req_id or len(req_id) > 128:
            if kind != "__invalid__":
                self.send(
                    {
                        "type": "error",
                        "id": None,
                        "code": "invalid_request",
                        "message": "request without a valid string id",
                    }
                )
            return
        try:
            if kind == "ping":
                self.send(self.hello(req_id))
            elif kind == "write_file":
                self.op_write_begin(req_id, msg)
            elif kind == "write_chunk":
                self.op_write_chunk(req_id, msg)
            elif kind == "cancel":
                target = msg.get("target")
                cancel = self.running.get(target) if isinstance(target, str) else None
                if callable(cancel):
                    cancel()
                self.send({"type": "cancel_result", "id": req_id, "found": callable(cancel)})
            elif kind == "reseed_rng":
                # Inline, not in a thread: after a snapshot restore this is on the critical path.
                self.op_reseed_rng(req_id, msg)
            elif kind in ("exec", "read_file", "list_files", "warmup", "shutdown"):
                self.workers.submit(self._guarded, kind, req_id, msg)
            else:
                raise RequestError("unknown_request", f"unknown request type {kind!r}")
        except RequestError as exc:
            self.send({"type": "error", "id": req_id, "code": exc.code, "message": exc.message})
        except Exception as exc:  # an agent bug must not kill the agent (it may be PID 1)
            self.send(
                {"type": "error", "id": req_id, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            )

    def _guarded(self, kind: str, req_id: str, msg: Msg) -> None:
        try:
            getattr(self, "op_" + kind)(req_id, msg)
        except RequestError as exc:
            self.send({"type": "error", "id": req_id, "code": exc.code, "message": exc.message})
        except Exception as exc:  # an agent bug must not kill the agent
            self.send(
                {"type": "error", "id": req_id, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            )

    # ---- exec

    def _check_exec(self, msg: Msg) -> tuple[Any, ...]:
        lang = msg.get("language")
        if lang not in LANG_EXT:
            raise RequestError("invalid_request", f"unknown language {lang!r}")
        if not self.interpreters.get(lang):
            raise RequestError("unsupported_language", f"no interpreter for {lang!r} in this guest")
        code = msg.get("code")
        if not isinstance(code, str) or len(code.encode()) > MAX_CODE_BYTES or "\x00" in code:
            raise RequestError("invalid_request", "code must be a string without NUL, at most 2 MiB")
        env = msg.get("env") or {}
        if not isinstance(env, dict) or any(
            not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k or "\x00" in k + v
            for k, v in env.items()
        ):
            raise RequestError("invalid_request", "env must map names to strings (no '=' or NUL)")
        timeout = msg.get("timeout_s", 30)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise RequestError("invalid_request", "timeout_s must be in (0, 86400]")
        caps = []
        for key in ("max_stdout_bytes", "max_stderr_bytes"):
            cap = msg.get(key, DEFAULT_OUTPUT_CAP)
            if not isinstance(cap, int) or cap < 0:
                raise RequestError("invalid_request", f"{key} must be a non-negative integer")
            caps.append(cap)
        cwd = self.workdir
        if msg.get("cwd"):
            cwd = self.resolve_dir(msg["cwd"])
        return lang, code, env, float(timeout), caps, cwd

    def op_exec(self, req_id: str, msg: Msg) -> None:
        _trace("exec received")
        lang, code, env, timeout, caps, cwd = self._check_exec(msg)
        out = Stream(self, req_id, "stdout", caps[0])
        err = Stream(self, req_id, "stderr", caps[1])
        started = time.monotonic()
        used_spare: Repl | None = None
        if msg.get("session"):
            result = self._exec_session(req_id, lang, code, env, timeout, cwd, out, err)
        else:
            used_spare = self._take_spare(lang)
            if used_spare is not None:
                result = self._exec_in_spare(req_id, used_spare, lang, code, env, timeout, cwd, out, err)
            else:
                result = self._exec_oneshot(req_id, lang, code, env, timeout, cwd, out, err)
        out.flush()
        err.flush()
        result.update(
            {
                "type": "exit",
                "id": req_id,
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "stdout_truncated": out.truncated,
                "stderr_truncated": err.truncated,
                "stdout_bytes": out.total,
                "stderr_bytes": err.total,
            }
        )
        self.send(result)
        _trace("exec replied")
        if used_spare is not None and msg.get("prime_spare") is True and self._keep_spare(lang, used_spare):
            return  # a warm-up block of the host's own: the spare stays, now with its paths translated
        if used_spare is not None:
            # A used spare dies only after the reply: its output is complete once it reported
            # "done", and killing its tree (a /proc walk) costs ~10 ms of guest CPU under TCG, which
            # must not hold the GIL before the writer thread has taken the reply.
            self.flush_out(0.05)
            with used_spare.lock:
                used_spare.stop()
        if not msg.get("session") and lang in self.spare_langs and msg.get("refill_spare") is not False:
            # After the reply: starting an interpreter competes for the guest's CPU with sending it.
            self.flush_out(0.05)
            self.ensure_spare(lang)

    def _exec_oneshot(self, req_id: str, lang: str, code: str, env: dict[str, str], timeout: float,
                      cwd: str, out: Stream, err: Stream) -> Msg:
        import select

        path = self.write_code_file(lang, code)
        interp = self.interpreters[lang]
        argv = {
            "python": lambda: [interp, "-u", path],
            "javascript": lambda: [interp, path],
            "raw": lambda: [*interp, path],
        }[lang]()
        cancelled = threading.Event()
        _trace("one-shot exec: spawning")
        cgroups = self.cgroups
        exec_cg = cgroups.create("exec") if cgroups is not None else None
        try:
            proc = self.spawn(argv, env=self.base_env(env), cwd=cwd, stdin=DEVNULL, cgroup=exec_cg)
        except OSError as exc:
            os.unlink(path)
            if exec_cg is not None and cgroups is not None:
                cgroups.kill(exec_cg)
            raise RequestError("spawn_failed", f"cannot start {lang}: {exc}") from None
        _trace("one-shot exec: spawned")
        self.running[req_id] = cancelled.set
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None and proc.stderr is not None
        fds = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        status = None
        timed_out = False
        exited_at = None
        try:
            while fds:
                now = time.monotonic()
                if status is None:
                    status = self.reaper.poll(proc.pid)
                    if status is not None:
                        exited_at = now
                if now >= deadline or cancelled.is_set():
                    timed_out = not cancelled.is_set()
                    break
                # The main process is gone but a background child holds the pipes: stop shortly.
                if exited_at is not None and now - exited_at > 0.2:
                    break
                ready, _, _ = select.select(list(fds), [], [], min(0.05, max(0.0, deadline - now)))
                for fd in ready:
                    data = os.read(fd, READ_CHUNK)
                    if data:
                        fds[fd].feed(data)
                    else:
                        del fds[fd]
            if not timed_out and not cancelled.is_set() and status is None:
                status = self.reaper.wait(proc.pid, max(0.0, deadline - time.monotonic()))
                timed_out = status is None
            _trace("one-shot exec: exited")
            # Leftovers (background children, or everything on timeout) die with the exec.
            if exec_cg is not None and cgroups is not None:
                cgroups.kill(exec_cg)
            else:
                kill_tree(proc.pid, self.protected_pids, self.run_uid, self.spawn_lock)
            _trace("one-shot exec: tree killed")
            if status is None:
                status = self.reaper.wait(proc.pid, 5.0)
            for fd in list(fds):
                _drain_nonblocking(fd, fds[fd])
        finally:
            self.running.pop(req_id, None)
            proc.returncode = status if status is not None else -9
            proc.stdout.close()
            proc.stderr.close()
            self.forget_pid(proc.pid)
            try:
                os.unlink(path)
            except OSError:
                pass
        if timed_out or cancelled.is_set():
            why = "timed out" if timed_out else "was cancelled"
            err.note(
                f"\n[sandbox] execution {why} after {timeout:g}s; the process tree was killed\n"
                if timed_out
                else "\n[sandbox] execution was cancelled; the process tree was killed\n"
            )
            return {
                "exit_code": -1,
                "signal": None,
                "timed_out": timed_out,
                "cancelled": cancelled.is_set(),
                "session_reset": False,
            }
        code_, sig = exit_code_of(status) if status is not None else (-1, None)
        return {
            "exit_code": code_,
            "signal": sig,
            "timed_out": False,
            "cancelled": False,
            "session_reset": False,
        }

    # ---- spare interpreters (fresh process per one-shot exec, without the interpreter start-up)

    def ensure_spare(self, lang: str) -> None:
        """Start a spare interpreter for ``lang`` in the background unless one exists or is starting."""
        if lang not in ("python", "javascript") or not self.interpreters.get(lang):
            return
        with self.spare_cond:
            if lang in self.spares or lang in self.spare_starting:
                return
            self.spare_starting.add(lang)
        threading.Thread(target=self._start_spare, args=(lang,), daemon=True).start()

    def _start_spare(self, lang: str) -> None:
        repl = Repl(self, lang)
        ok = kept = False
        with self.spare_cond:
            epoch = self.rng_epoch
        try:
            with repl.lock:
                repl.start()
                repl.submit("")
                outcome = self._await_repl(repl, None, None, time.monotonic() + 120, threading.Event())
                ok = outcome[0] == "done"
                # A reseed_rng that arrived while this spare was starting did not see it: catch up.
                while ok:
                    with self.spare_cond:
                        if self.rng_epoch == epoch:
                            break
                        epoch = self.rng_epoch
                    self._reseed_locked(lang, repl)
                    ok = repl.alive()
        except Exception:
            ok = False
        with self.spare_cond:
            self.spare_starting.discard(lang)
            if ok and lang in self.spare_langs and self.rng_epoch == epoch:
                self.spares[lang] = repl
                kept = True
            self.spare_cond.notify_all()
        if not kept:
            repl.stop()

    def _keep_spare(self, lang: str, repl: Repl) -> bool:
        """Put a spare that ran a priming block back (unless it died, or another took its place)."""
        with self.spare_cond:
            if not repl.alive() or lang in self.spares or lang not in self.spare_langs:
                return False
            if lang == "python":
                repl.reseed_pending = True  # cheap insurance: it was out of self.spares for a while
            self.spares[lang] = repl
            self.spare_cond.notify_all()
            return True

    def _take_spare(self, lang: str, wait_s: float = 60.0) -> Repl | None:
        deadline = time.monotonic() + wait_s
        with self.spare_cond:
            # A spare being started is already part-way through its start-up: waiting beats a cold start.
            while lang not in self.spares and lang in self.spare_starting and time.monotonic() < deadline:
                self.spare_cond.wait(0.5)
            repl = self.spares.pop(lang, None)
        return repl if repl is not None and repl.alive() else None

    def _exec_in_spare(self, req_id: str, repl: Repl, lang: str, code: str, env: dict[str, str],
                       timeout: float, cwd: str, out: Stream, err: Stream) -> Msg:
        cancelled = threading.Event()
        with repl.lock:
            if not repl.alive():  # died while being reseeded: a plain one-shot run instead
                return self._exec_oneshot(req_id, lang, code, env, timeout, cwd, out, err)
            repl.submit(_session_prefix(lang, env, cwd, self.workdir) + code)
            self.running[req_id] = cancelled.set
            try:
                kind, value = self._await_repl(repl, out, err, time.monotonic() + timeout, cancelled)
            except BaseException:
                repl.stop()
                raise
            finally:
                self.running.pop(req_id, None)
            # Used once: op_exec stops the interpreter and anything it left behind after replying.
        if kind == "done":
            return {"exit_code": value, "signal": None, "timed_out": False, "cancelled": False,
                    "session_reset": False}
        if kind == "died":  # e.g. os._exit(3) / process.exit(3): an ordinary end for a one-shot run
            code_, sig = exit_code_of(value) if value is not None else (-1, None)
            return {"exit_code": code_, "signal": sig, "timed_out": False, "cancelled": False,
                    "session_reset": False}
        timed_out = kind == "timeout"
        err.note(f"\n[sandbox] execution timed out after {timeout:g}s; the process tree was killed\n"
                 if timed_out else "\n[sandbox] execution was cancelled; the process tree was killed\n")
        return {"exit_code": -1, "signal": None, "timed_out": timed_out, "cancelled": not timed_out,
                "session_reset": False}

    def _wait_spare(self, lang: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.spare_cond:
            while lang not in self.spares and lang in self.spare_starting and time.monotonic() < deadline:
                self.spare_cond.wait(0.5)
            return lang in self.spares

    def repl_for(self, lang: str) -> Repl:
        with self.repl_guard:
            repl = self.repls.get(lang)
            if repl is None:
                repl = self.repls[lang] = Repl(self, lang)
        with repl.lock:
            if not repl.alive():
                repl.start()
                # Run an empty block so "warm" means the interpreter is fully loaded.
                repl.submit("")
                self._await_repl(repl, None, None, time.monotonic() + 60, threading.Event())
                if repl.pending_file:
                    try:
                        os.unlink(repl.pending_file)
                    except OSError:
                        pass
        return repl

    def _exec_session(self, req_id: str, lang: str, code: str, env: dict[str, str], timeout: float,
                      cwd: str, out: Stream, err: Stream) -> Msg:
        if not self.interpreters.get(lang):
            raise RequestError("unsupported_language", f"no interpreter for {lang!r}")
        repl = self.repl_for(lang)
        cancelled = threading.Event()
        with repl.lock:
            if not repl.alive():
                repl.start()
            prefix = _session_prefix(lang, env, cwd, self.workdir)
            self._enter_block(repl)
            repl.submit(prefix + code)
            self.running[req_id] = cancelled.set
            try:
                outcome = self._await_repl(repl, out, err, time.monotonic() + timeout, cancelled)
            finally:
                self.running.pop(req_id, None)
                self._leave_block(repl)
                if repl.pending_file:
                    try:
                        os.unlink(repl.pending_file)
                    except OSError:
                        pass
        kind, value = outcome
        if kind == "done":
            return {
                "exit_code": value,
                "signal": None,
                "timed_out": False,
                "cancelled": False,
                "session_reset": False,
            }
        if kind == "died":
            code_, sig = exit_code_of(value) if value is not None else (-1, None)
            err.note("\n[sandbox] the session interpreter exited; its state was reset\n")
            return {
                "exit_code": code_,
                "signal": sig,
                "timed_out": False,
                "cancelled": False,
                "session_reset": True,
            }
        why = "timed out" if kind == "timeout" else "was cancelled"
        err.note(
            f"\n[sandbox] execution {why} after {timeout:g}s; the session was restarted and its "
            "state was lost\n"
            if kind == "timeout"
            else "\n[sandbox] execution was cancelled; the session was restarted and its state was lost\n"
        )
        return {
            "exit_code": -1,
            "signal": None,
            "timed_out": kind == "timeout",
            "cancelled": kind == "cancelled",
            "session_reset": True,
        }

    def _enter_block(self, repl: Repl) -> None:
        """A session block runs in a cgroup of its own: what it starts cannot outlive it."""
        cgroups = self.cgroups
        if cgroups is None or repl.cg is None or repl.proc is None:
            return
        exec_cg = cgroups.create("exec")
        try:
            Cgroups.move(exec_cg, repl.proc.pid)
        except OSError:
            cgroups.remove(exec_cg)
            return
        repl.exec_cg = exec_cg

    def _leave_block(self, repl: Repl) -> None:
        """The interpreter goes back to its own group; everything else the block started dies."""
        cgroups = self.cgroups
        exec_cg = repl.exec_cg
        if cgroups is None or exec_cg is None:
            return
        repl.exec_cg = None
        if repl.proc is not None and repl.cg is not None:
            try:
                Cgroups.move(repl.cg, repl.proc.pid)
            except OSError:
                pass
            # Anything the interpreter itself started while at rest (threads, JS timers) goes too.
            cgroups.kill_others(repl.cg, repl.proc.pid)
        cgroups.kill(exec_cg)

    def _await_repl(self, repl: Repl, out: Stream | None, err: Stream | None, deadline: float,
                    cancelled: threading.Event) -> tuple[str, int | None]:
        """Pump a REPL until its status line ("done"), its death ("died"), timeout or cancel."""
        import select

        proc = repl.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        status_fd = repl.status_r
        while True:
            now = time.monotonic()
            if now >= deadline or cancelled.is_set():
                for fd, s in streams.items():
                    _drain_nonblocking(fd, s)
                repl.stop()
                return ("timeout" if not cancelled.is_set() else "cancelled", None)
            ready, _, _ = select.select([*streams, status_fd], [], [], min(0.1, deadline - now))
            for fd in ready:
                if fd == status_fd:
                    continue
                _drain_nonblocking(fd, streams[fd])
            if status_fd in ready:
                try:
                    rc = repl.read_status()
                except EOFError:
                    for fd, s in streams.items():
                        _drain_nonblocking(fd, s)
                    status = self.reaper.wait(proc.pid, 2.0)
                    proc.returncode = status if status is not None else -9
                    repl.stop()
                    return ("died", status)
                if rc is not None:
                    # The driver flushed before writing the status: output is already in the pipes.
                    for fd, s in streams.items():
                        _drain_nonblocking(fd, s)
                    return ("done", rc)

    # ---- warm-up, rng, shutdown

    def op_warmup(self, req_id: str, msg: Msg) -> None:
        langs = msg.get("languages") or []
        if not isinstance(langs, list) or any(lang not in LANG_EXT for lang in langs):
            raise RequestError("invalid_request", "languages must be a list of python/javascript/raw")
        _prime_reseed()  # a snapshot taken after a warm-up then reseeds without importing anything
        want_session = msg.get("session", True) is not False
        want_spare = msg.get("spare") is True
        results: dict[str, str | None] = {}
        for lang in langs:
            if not self.interpreters.get(lang):
                results[lang] = f"no interpreter for {lang!r}"
                continue
            try:
                if want_session:
                    self.repl_for(lang)
                if want_spare and lang != "raw":
                    with self.spare_cond:
                        self.spare_langs.add(lang)
                    self.ensure_spare(lang)
                    if not self._wait_spare(lang, 120):
                        raise RuntimeError("the spare interpreter did not start")
                results[lang] = None
            except Exception as exc:
                results[lang] = f"{type(exc).__name__}: {exc}"
        self.send(
            {
                "type": "warmup_result",
                "id": req_id,
                "ready": sorted(k for k, v in results.items() if v is None),
                "errors": {k: v for k, v in results.items() if v is not None},
            }
        )

    def op_reseed_rng(self, req_id: str, msg: Msg) -> None:
        """Reseed the kernel CRNG and every live interpreter's PRNG. Cheap: it runs inline.

        The kernel part: mix + credit the host's seed, then force a CRNG reseed (an initialised
        CRNG otherwise reseeds only every 60 s, so snapshot clones kept drawing identical urandom
        bytes). Processes started from now on draw fresh randomness, including Python's
        string-hash secret (PYTHONHASHSEED is deliberately left unset: every new interpreter draws
        its own from getrandom(), while an explicit value would be shared by every Python the user
        code starts). Interpreters that already existed - the session REPLs and the spare one-shot
        interpreters, e.g. from a snapshot - are flagged: the driver reseeds ``random`` (and
        resets ``tempfile``'s name generator) right before running its next block, so no user
        code runs on the old state and a restore costs no interpreter work. Their string-hash
        secret is fixed at process start and stays what it was in the snapshot. JavaScript
        REPLs are restarted (V8 cannot reseed Math.random), under their lock, in the background.

        The clone also gets its own identity here (:func:`_regenerate_identity`): boot_id,
        machine-id and a random next PID, so clones of one snapshot cannot be told apart from
        their parent or predict each other's PIDs.
        """
        seed = _decode_seed(msg.get("seed"))
        credited = _reseed_kernel(seed)
        _regenerate_identity()  # after the reseed: the new ids come from the reseeded CRNG
        with self.spare_cond:
            self.rng_epoch += 1
            spares = list(self.spares.items())
        restart: list[tuple[Repl, bool]] = []
        reseeded: set[str] = set()
        spares_reseeded: set[str] = set()
        for kind, (lang, repl) in [*(("session", x) for x in self.repls.items()),
                                   *(("spare", x) for x in spares)]:
            if not repl.alive():
                continue
            if lang == "python":
                repl.reseed_pending = True  # the driver reseeds before the next block, user code after
            elif lang == "javascript":
                # Locked here when idle, so no block can slip in before the restart below.
                restart.append((repl, repl.lock.acquire(blocking=False)))
            else:
                continue  # the shell has no PRNG of its own
            (reseeded if kind == "session" else spares_reseeded).add(lang)
        self.send({"type": "reseed_result", "id": req_id, "mixed_bytes": len(seed),
                   "credited_bits": credited, "repls_reseeded": sorted(reseeded),
                   "spares_reseeded": sorted(spares_reseeded)})
        if restart:
            threading.Thread(target=self._restart_js, args=(restart,), daemon=True).start()

    def _restart_js(self, repls: list[tuple[Repl, bool]]) -> None:
        for repl, locked in repls:
            if not locked:
                repl.lock.acquire()  # it was busy: restart it as soon as its block is done
            try:
                self._reseed_locked(repl.language, repl)
            except Exception:
                pass
            finally:
                repl.lock.release()

    def _reseed_locked(self, lang: str, repl: Repl) -> None:
        if not repl.alive():
            return
        if lang == "python":
            repl.reseed_pending = True
        elif lang == "javascript":
            # V8 cannot reseed Math.random: start a fresh interpreter (a warm one holds no state).
            repl.stop()
            repl.start()
            repl.submit("")
            self._await_repl(repl, None, None, time.monotonic() + 60, threading.Event())

    def terminate(self) -> None:
        """Kill every interpreter and process the agent started, then exit (host mode only)."""
        with self.spawn_lock:
            self.terminating = True  # no spawn can slip in after the sweep below
        with self.spare_cond:
            spares = list(self.spares.values())
            self.spares.clear()
            self.spare_langs.clear()
        for repl in [*self.repls.values(), *spares]:
            try:
                repl.stop()
            except Exception:
                pass
        with self.tracked_lock:
            pids = list(self.tracked)
        for pid in pids:
            kill_tree(pid, lambda: set(), self.run_uid, self.spawn_lock)
        os._exit(0)

    def op_shutdown(self, req_id: str, msg: Msg) -> None:
        self.send({"type": "shutdown_result", "id": req_id, "action": self.args.shutdown_action})
        self.flush_out(2.0)
        time.sleep(0.05)
        with self.spare_cond:
            spares = list(self.spares.values())
            self.spares.clear()
            self.spare_langs.clear()
        for repl in [*self.repls.values(), *spares]:
            repl.stop()
        action = self.args.shutdown_action
        if action == "exit":
            os._exit(0)
        import ctypes

        os.sync()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(0x01234567 if action == "reboot" else 0x4321FEDC)
        os._exit(1)

    # ---- files

    def _parts(self, path: object, *, allow_root: bool) -> list[str]:
        if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
            raise RequestError("invalid_path", "path must be a non-empty string without NUL")
        if path.startswith("/"):
            if path.rstrip("/") == self.workdir:
                rel = ""
            elif path.startswith(self.workdir + "/"):
                rel = path[len(self.workdir) + 1 :]
            else:
                raise RequestError("path_refused", f"{path!r} is outside the work dir {self.workdir}")
        else:
            rel = path
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise RequestError("path_refused", f"{path!r}: '..' is not allowed")
        if not parts and not allow_root:
            raise RequestError("invalid_path", f"{path!r} names the work dir itself")
        return parts

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """Open the directory ``parts`` under the work dir without following any symlink."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise RequestError("not_found", f"directory {part!r} does not exist") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._chown(part, fd)
                    nfd = os.open(part, flags, dir_fd=fd)
                except OSError:
                    raise RequestError(
                        "path_refused", f"{part!r} is not a directory (symlinks are refused)"
                    ) from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _chown(self, name: str, dir_fd: int) -> None:
        if self.run_uid is not None:
            os.chown(
                name,
                self.run_uid,
                self.run_gid if self.run_gid is not None else -1,
                dir_fd=dir_fd,
                follow_symlinks=False,
            )

    def resolve_dir(self, path: str) -> str:
        parts = self._parts(path, allow_root=True)
        os.close(self._open_dir(parts, create=False))
        return os.path.join(self.workdir, *parts)

    def op_write_begin(self, req_id: str, msg: Msg) -> None:
        import hashlib

        size, digest = msg.get("size"), msg.get("sha256")
        if not isinstance(size, int) or size < 0:
            raise RequestError("invalid_request", "size must be a non-negative integer")
        if not isinstance(digest, str) or len(digest) != 64:
            raise RequestError("invalid_request", "sha256 must be 64 hex digits")
        parts = self._parts(msg.get("path"), allow_root=False)
        dfd = self._open_dir(parts[:-1], create=True)
        tmp = f".sbx-upload-{self.next_n()}.part"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
            )
        except OSError as exc:
            os.close(dfd)
            raise RequestError("io_error", f"cannot create file: {exc}") from None
        up = {
            "dfd": dfd,
            "fd": fd,
            "tmp": tmp,
            "name": parts[-1],
            "size": size,
            "sha256": digest,
            "got": 0,
            "seq": 0,
            "hash": hashlib.sha256(),
            "exec": bool(msg.get("make_executable")),
        }
        self.uploads[req_id] = up
        if size == 0:
            self._finish_upload(req_id, up)

    def op_write_chunk(self, req_id: str, msg: Msg) -> None:
        import base64
        import binascii
        import hashlib

        up = self.uploads.get(req_id)
        if up is None:
            return  # the upload already failed and was reported; ignore its remaining chunks
        try:
            data = base64.b64decode(msg.get("data", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            self._abort_upload(req_id, up, "invalid_request", "chunk data is not base64")
            return
        if msg.get("seq") != up["seq"]:
            self._abort_upload(req_id, up, "invalid_request", f"expected chunk {up['seq']}")
            return
        if hashlib.sha256(data).hexdigest() != msg.get("sha256"):
            self._abort_upload(req_id, up, "checksum_mismatch", f"chunk {up['seq']} sha256 mismatch")
            return
        if up["got"] + len(data) > up["size"] or len(data) > MAX_CHUNK_BYTES:
            self._abort_upload(req_id, up, "invalid_request", "more data than announced")
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(up["fd"], view) :]
        except OSError as exc:
            self._abort_upload(req_id, up, "io_error", f"write failed: {exc}")
            return
        up["hash"].update(data)
        up["got"] += len(data)
        up["seq"] += 1
        if up["got"] == up["size"]:
            self._finish_upload(req_id, up)

    def _abort_upload(self, req_id: str, up: Msg, code: str, message: str, *, reply: bool = True) -> None:
        self.uploads.pop(req_id, None)
        os.close(up["fd"])
        try:
            os.unlink(up["tmp"], dir_fd=up["dfd"])
        except OSError:
            pass
        os.close(up["dfd"])
        if reply:
            self.send({"type": "error", "id": req_id, "code": code, "message": message})

    def _finish_upload(self, req_id: str, up: Msg) -> None:
        digest = up["hash"].hexdigest()
        if digest != up["sha256"].lower():
            self._abort_upload(
                req_id, up, "checksum_mismatch", f"file sha256 {digest} != announced {up['sha256']}"
            )
            return
        try:
            os.fchmod(up["fd"], 0o755 if up["exec"] else 0o644)
            if self.run_uid is not None:
                os.fchown(up["fd"], self.run_uid, self.run_gid if self.run_gid is not None else -1)
            os.rename(up["tmp"], up["name"], src_dir_fd=up["dfd"], dst_dir_fd=up["dfd"])
        except OSError as exc:
            self._abort_upload(req_id, up, "io_error", f"cannot place file: {exc}")
            return
        self.uploads.pop(req_id, None)
        os.close(up["fd"])
        os.close(up["dfd"])
        self.send({"type": "write_result", "id": req_id, "size": up["got"], "sha256": digest})

    def op_read_file(self, req_id: str, msg: Msg) -> None:
        import base64
        import hashlib
        import stat

        chunk_size = msg.get("chunk_size", 1024 * 1024)
        if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_BYTES:
            raise RequestError("invalid_request", "chunk_size must be 1..2 MiB")
        parts = self._parts(msg.get("path"), allow_root=False)
        dfd = self._open_dir(parts[:-1], create=False)
        try:
            try:
                fd = os.open(
                    parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
                )
            except FileNotFoundError:
                raise RequestError("not_found", f"{msg['path']!r} does not exist") from None
            except OSError as exc:
                raise RequestError("path_refused", f"cannot open {msg['path']!r}: {exc}") from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RequestError("invalid_path", f"{msg['path']!r} is not a regular file")
            whole = hashlib.sha256()
            seq = offset = 0
            while True:
                data = os.read(fd, chunk_size)
                if not data:
                    break
                whole.update(data)
                self.send(
                    {
                        "type": "file_chunk",
                        "id": req_id,
                        "seq": seq,
                        "offset": offset,
                        "data": base64.b64encode(data).decode(),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
                seq += 1
                offset += len(data)
        finally:
            os.close(fd)
        self.send(
            {"type": "read_result", "id": req_id, "size": offset, "chunks": seq, "sha256": whole.hexdigest()}
        )

    def op_list_files(self, req_id: str, msg: Msg) -> None:
        parts = self._parts(msg.get("path") or ".", allow_root=True)
        dfd = self._open_dir(parts, create=False)
        entries = []
        try:
            with os.scandir(dfd) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    entries.append(
                        {
                            "name": e.name,
                            "is_dir": is_dir,
                            "is_symlink": e.is_symlink(),
                            "size": 0 if is_dir else st.st_size,
                        }
                    )
        finally:
            os.close(dfd)
        entries.sort(key=lambda x: str(x["name"]))
        self.send({"type": "list_result", "id": req_id, "entries": entries})


def _session_prefix(lang: str, env: Msg, cwd: str, workdir: str) -> str:
    """Per-exec env/cwd applied inside the persistent interpreter (they persist, like a shell)."""
    if not env and cwd == workdir:
        return ""
    if lang == "python":
        lines = [f"__import__('os').environ.update({env!r})"] if env else []
        if cwd != workdir:
            lines.append(f"__import__('os').chdir({cwd!r})")
        return "\n".join(lines) + "\n"
    if lang == "javascript":
        parts = [f"Object.assign(process.env, {json_dumps(env, ascii=True)});"] if env else []
        if cwd != workdir:
            parts.append(f"process.chdir({json_dumps(cwd, ascii=True)});")
        return "".join(parts)
    out = [f"export {k}={_sh_quote(v)}" for k, v in env.items()]
    if cwd != workdir:
        out.append(f"cd {_sh_quote(cwd)}")
    return "\n".join(out) + "\n"


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _drain_nonblocking(fd: int, stream: Stream | None) -> None:
    blocking = os.get_blocking(fd)
    if blocking:
        os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            if stream is not None:
                stream.feed(data)
    finally:
        if blocking:
            try:
                os.set_blocking(fd, True)
            except OSError:
                pass


STD_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def _which(name: str) -> str | None:
    # Only the standard PATH user code also gets: an interpreter must be usable by the sandbox user.
    for d in STD_PATH.split(":"):
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _become_subreaper() -> None:
    # Orphans of user code then re-parent to the agent, so kill_tree can find and reap them.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


class Args:
    """Command-line options (see ``--help``)."""

    port_name: str = DEFAULT_PORT_NAME
    device: str | None = None
    unix_connect: str | None = None
    unix_listen: str | None = None
    workdir: str = "/home/sandbox"
    home: str | None = None
    user_name: str = "sandbox"
    run_as_uid: int | None = None
    run_as_gid: int | None = None
    no_drop_privileges: bool = False
    rundir: str | None = None
    python: str | None = None
    node: str | None = None
    shell: str | None = None
    warm: list[str] | None = None
    shutdown_action: str | None = None
    max_user_processes: int = 256
    spare: list[str] | None = None


_VALUE_FLAGS = {"--port-name", "--device", "--unix-connect", "--unix-listen", "--workdir", "--home",
                "--user-name", "--run-as-uid", "--run-as-gid", "--rundir", "--python", "--node", "--shell",
                "--warm", "--spare", "--shutdown-action", "--max-user-processes"}


def _fast_parse(argv: list[str]) -> Args | None:
    """argparse costs milliseconds on the boot path; the common well-formed case needs none of it."""
    args = Args()
    i = 0
    transports = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag == "--no-drop-privileges" and not eq:
            args.no_drop_privileges = True
            i += 1
            continue
        if flag not in _VALUE_FLAGS:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        attr = flag[2:].replace("-", "_")
        if attr in ("port_name", "device", "unix_connect", "unix_listen"):
            transports += 1
        if attr in ("run_as_uid", "run_as_gid", "max_user_processes"):
            if not value.isdigit():
                return None
            setattr(args, attr, int(value))
        elif attr in ("warm", "spare"):
            if value not in LANG_EXT:
                return None
            setattr(args, attr, [*(getattr(args, attr) or []), value])
        elif attr == "shutdown_action" and value not in ("exit", "reboot", "poweroff"):
            return None
        else:
            setattr(args, attr, value)
    return args if transports <= 1 else None


def _argparse(argv: list[str]) -> Args:
    import argparse

    p = argparse.ArgumentParser(prog="sbx-agent", description="exec_sandbox guest agent")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--port-name", default=DEFAULT_PORT_NAME,
                   help=f"virtio-serial port name (default {DEFAULT_PORT_NAME})")
    t.add_argument("--device", help="explicit character device (e.g. /dev/vport0p1)")
    t.add_argument("--unix-connect", metavar="PATH", help="connect to a unix socket server (tests)")
    t.add_argument("--unix-listen", metavar="PATH", help="listen on a unix socket (tests)")
    p.add_argument("--workdir", default="/home/sandbox",
                   help="user code's cwd; file paths are confined to it")
    p.add_argument("--home", default=None, help="HOME for user code (default: the work dir)")
    p.add_argument("--user-name", default="sandbox", help="USER/LOGNAME for user code")
    p.add_argument("--run-as-uid", type=int, default=None, help="uid for user code (default 1000 when root)")
    p.add_argument("--run-as-gid", type=int, default=None, help="gid for user code (default: the uid)")
    p.add_argument("--no-drop-privileges", action="store_true", help="run user code as the agent's user")
    p.add_argument("--max-user-processes", type=int, default=256,
                   help="RLIMIT_NPROC for the sandbox uid (0: no limit; only when dropping privileges)")
    p.add_argument("--rundir", default=None, help="where code files are staged (default /tmp)")
    p.add_argument("--python", default=None, help="python interpreter (default python3 on PATH)")
    p.add_argument("--node", default=None, help="node interpreter (default node/nodejs on PATH)")
    p.add_argument("--shell", default=None, help="shell for raw (default sh, else busybox sh)")
    p.add_argument("--warm", action="append", choices=sorted(LANG_EXT), help="start this REPL at boot")
    p.add_argument("--spare", action="append", choices=sorted(LANG_EXT),
                   help="keep a started interpreter ready for the next one-shot exec (python, javascript)")
    p.add_argument("--shutdown-action", choices=["exit", "reboot", "poweroff"], default=None,
                   help="what 'shutdown' does (default: reboot as PID 1 - use QEMU -no-reboot -, else exit)")
    ns = p.parse_args(argv)
    args = Args()
    for key, value in vars(ns).items():
        setattr(args, key, value)
    return args


def parse_args(argv: list[str]) -> Args:
    args = _fast_parse(argv) or _argparse(argv)
    if args.no_drop_privileges:
        args.run_as_uid = args.run_as_gid = None
    elif args.run_as_uid is None and os.geteuid() == 0:
        args.run_as_uid, args.run_as_gid = 1000, 1000
    if args.run_as_uid is not None and args.run_as_gid is None:
        args.run_as_gid = args.run_as_uid
    if args.shutdown_action is None:
        args.shutdown_action = "reboot" if os.getpid() == 1 else "exit"
    return args


def cmdline_flags(cmdline: str) -> list[str]:
    """Extra agent flags from the kernel command line: ``sbx.agent=--spare=python,--warm=python``.

    The guest init execs the agent with fixed arguments; this lets the host choose per boot.
    """
    flags: list[str] = []
    for token in cmdline.split():
        if token.startswith("sbx.agent="):
            flags += [f for f in token[len("sbx.agent="):].split(",") if f]
    return flags


def main(argv: list[str] | None = None) -> int:
    _trace("main")
    if argv is None:
        argv = sys.argv[1:]
        if os.getpid() == 1:
            try:
                with open("/proc/cmdline") as fh:
                    argv = argv + cmdline_flags(fh.read())
            except OSError:
                pass
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    unix_path = args.unix_connect or args.unix_listen
    if unix_path:
        transport: Transport = UnixTransport(unix_path, listen=bool(args.unix_listen))
    else:
        transport = VirtioTransport(args.port_name, args.device)
    _trace("transport open")
    agent = Agent(args)
    if os.getpid() != 1:
        import signal

        # On the host (tests), SIGTERM must not orphan interpreters; PID 1 never gets SIGTERM.
        signal.signal(signal.SIGTERM, lambda _sig, _frame: agent.terminate())
    while True:
        try:
            agent.run(transport)
            return 0
        except Exception as exc:  # as PID 1 the agent must not exit: log and keep serving
            print(f"sbx-agent: main loop error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
