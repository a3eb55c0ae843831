"""Containment: one cgroup v2 group per exec (``cgroup.kill``), and the /proc-walking fallback."""

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


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
