"""Output streams and persistent interpreters (the REPL drivers in ``drivers/``)."""

from __future__ import annotations

import os
import threading

from .cgroups import kill_tree
from .procs import DEVNULL, Proc
from .wire import READ_CHUNK, json_dumps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from .wire import Msg

    class AgentCore(Protocol):
        """What streams and interpreters use of the agent (core.AgentCore; a protocol here so
        that this module does not import the one that imports it)."""

        workdir: str
        run_uid: int | None
        run_gid: int | None

        @property
        def interpreters(self) -> Any: ...
        @property
        def cgroups(self) -> Any: ...
        @property
        def protected_pids(self) -> Any: ...
        @property
        def spawn_lock(self) -> Any: ...
        @property
        def reaper(self) -> Any: ...
        def send(self, msg: Msg) -> None: ...
        def base_env(self, extra: Msg) -> Msg: ...
        def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str, stdin: int,
                  pass_fds: tuple[int, ...] = (), cgroup: str | None = None) -> Proc: ...
        def forget_pid(self, pid: int) -> None: ...
        def write_code_file(self, language: str, code: str) -> str: ...

DRIVERS = {"python": "python_repl.py", "javascript": "node_repl.js"}
#: The Node-API addon that reseeds a JavaScript interpreter in place (built by the image builder
#: from drivers/reseed.c; absent elsewhere, where a reseed restarts the interpreter instead).
NODE_RESEED_ADDON = os.path.join(os.path.dirname(__file__), "drivers", "reseed.node")
_driver_cache: dict[str, str] = {}


def driver_source(language: str) -> str:
    """The REPL driver of ``language`` (a file in ``drivers/``), read once: it is passed to the
    interpreter with ``-c`` / ``-e``, so user code sees the interpreter's usual ``sys.path`` /
    module setup rather than a script's."""
    src = _driver_cache.get(language)
    if src is None:
        path = os.path.join(os.path.dirname(__file__), "drivers", DRIVERS[language])
        with open(path, encoding="utf-8") as fh:
            src = _driver_cache[language] = fh.read()
    return src


class Stream:
    """One output stream of one exec: cap, UTF-8 incremental decoding, byte counting."""

    def __init__(self, agent: AgentCore, req_id: str, name: str, cap: int) -> None:
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

    def __init__(self, agent: AgentCore, language: str) -> None:
        self.agent = agent
        self.language = language
        self.lock = threading.Lock()
        self.proc: Proc | None = None
        self.pending_file: str | None = None
        self.status_buf = b""
        self.ctl_w = -1
        self.status_r = -1
        self.reseed_pending = False  # reseed its PRNGs before running the next block (see can_reseed)
        self.cg: str | None = None  # the interpreter's own cgroup (its home between blocks)
        self.exec_cg: str | None = None  # a session block's cgroup while the block runs

    def alive(self) -> bool:
        return self.proc is not None

    @property
    def can_reseed(self) -> bool:
        """The driver reseeds in place (``r`` mark): Python always, JavaScript with the addon."""
        return self.language == "python" or (
            self.language == "javascript" and os.path.exists(NODE_RESEED_ADDON))

    def start(self) -> None:
        agent = self.agent
        code_r, code_w = os.pipe()
        status_r, status_w = os.pipe()
        env = agent.base_env({})
        env["SBX_REPL_IN"] = str(code_r)
        env["SBX_REPL_OUT"] = str(status_w)
        if self.language == "javascript" and os.path.exists(NODE_RESEED_ADDON):
            env["SBX_REPL_RESEED"] = NODE_RESEED_ADDON
        stdin = DEVNULL
        if self.language == "python":
            argv = [agent.interpreters["python"], "-u", "-c", driver_source("python")]
        elif self.language == "javascript":
            argv = [agent.interpreters["javascript"], "-e", driver_source("javascript")]
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
            if self.reseed_pending and self.can_reseed:
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


def session_prefix(lang: str, env: Msg, cwd: str, workdir: str) -> str:
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


def drain_nonblocking(fd: int, stream: Stream | None) -> None:
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
