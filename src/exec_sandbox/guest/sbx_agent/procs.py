"""Processes: a Popen without subprocess, the reaper, the worker threads."""

from __future__ import annotations

import os
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

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
        if uid is not None:
            # The user's own pipes: re-opening them through /proc (/dev/stdout, /dev/stderr) checks
            # the pipe inode's owner, which is otherwise the root agent (mode 0600).
            for fd in (out_w, err_w):
                os.fchown(fd, uid, gid if gid is not None else -1)
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



STD_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def which(name: str) -> str | None:
    # Only the standard PATH user code also gets: an interpreter must be usable by the sandbox user.
    for d in STD_PATH.split(":"):
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
# What a Linux box has and the kernel's devtmpfs does not (udev or systemd make them elsewhere).
DEV_LINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
             ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"))


_libc: Any = None
_nnp_threads: set[int] = set()
_nnp_inherited: bool | None = None  # the whole process has it (the guest init starts us so)


def process_has_no_new_privs() -> bool:
    """True when the process was started with ``no_new_privs`` (the guest init runs the agent under
    ``setpriv --nnp``): every thread has it then, and nothing needs ctypes."""
    global _nnp_inherited
    if _nnp_inherited is None:
        try:
            with open("/proc/self/status", "rb") as fh:
                _nnp_inherited = b"\nNoNewPrivs:\t1" in fh.read()
        except OSError:
            _nnp_inherited = False
    return _nnp_inherited


def harden(*, subreaper: bool) -> None:
    """Load libc through ctypes (~30 ms under TCG: the agent calls this from a thread of its own,
    off the boot path; not at all in the guest, whose init gives the agent ``no_new_privs``) and,
    for the agent run on a host for tests (PID 1 is one already), become a subreaper: orphans of
    user code re-parent to the agent, so kill_tree can find and reap them."""
    global _libc
    if not subreaper and process_has_no_new_privs():
        return
    try:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        if subreaper:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass


def no_new_privs() -> None:
    """Set ``no_new_privs`` on the calling thread (it is per thread; a fork inherits the forking
    thread's), once per thread: no exec of user code, or of what it starts, can gain privileges -
    setuid/setgid bits and file capabilities are ignored. The agent itself never needs to: it drops
    to the sandbox uid with setuid() and powers off with reboot(2)."""
    tid = threading.get_ident()
    if tid in _nnp_threads or process_has_no_new_privs():
        return
    if _libc is None:
        harden(subreaper=False)
    if _libc is not None and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        _nnp_threads.add(tid)


def make_dev_links() -> None:
    """/dev/fd and /dev/std{in,out,err} (the guest's PID 1 only: /dev is the kernel's devtmpfs)."""
    for target, link in DEV_LINKS:
        try:
            os.symlink(target, link)
        except OSError:
            pass
