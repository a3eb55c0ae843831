"""System requests: warm-up, RNG reseed and clone identity, shutdown."""

from __future__ import annotations

import os
import sys
import threading
import time

from .cgroups import kill_tree
from .repl_ops import ReplOps
from .wire import LANG_EXT, RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .repl import Repl
    from .wire import Msg

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


# A guest clock within this of the host's is left alone: the stamp is already a request's transit
# (up to ~150 ms for a freshly restored guest under TCG) old, so stepping would move it backwards.
CLOCK_TOLERANCE_NS = 250_000_000


def _set_wall_clock(value: object) -> float | None:
    """Step CLOCK_REALTIME to the host's ``value`` (ns since the epoch) when it is off by more than
    the tolerance - a restored snapshot's clock reads the time the snapshot was taken. Returns the
    step in ms, None when left alone (no stamp, close enough, or not PID 1 of a guest: an agent run
    on a host for tests must never touch the host's clock)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestError("invalid_request", "wall_time_ns must be a non-negative integer")
    step = value - time.clock_gettime_ns(time.CLOCK_REALTIME)
    if abs(step) <= CLOCK_TOLERANCE_NS or os.getpid() != 1:
        return None
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, value)
    except OSError:
        return None
    return step / 1e6


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


class SystemOps(ReplOps):
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
        interpreters are flagged the same way when the guest has the driver's reseed addon
        (OpenSSL's DRBGs through RAND_add, Math.random replaced by one drawing from them); without
        it they are restarted (V8 cannot reseed Math.random), under their lock, in the background -
        which after a snapshot restore costs a whole node start-up under TCG (~3-5 s).

        The wall clock is stepped to the host's (``wall_time_ns``): a restored snapshot's clock
        reads the time the snapshot was taken, and certificates issued since then look "not yet
        valid" to TLS in the guest. The clone also gets its own identity here
        (:func:`_regenerate_identity`): boot_id, machine-id and a random next PID, so clones of one
        snapshot cannot be told apart from their parent or predict each other's PIDs.
        """
        seed = _decode_seed(msg.get("seed"))
        clock_step_ms = _set_wall_clock(msg.get("wall_time_ns"))
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
            if repl.can_reseed:
                repl.reseed_pending = True  # the driver reseeds before the next block, user code after
            elif lang == "javascript":
                # Locked here when idle, so no block can slip in before the restart below.
                restart.append((repl, repl.lock.acquire(blocking=False)))
            else:
                continue  # the shell has no PRNG of its own
            (reseeded if kind == "session" else spares_reseeded).add(lang)
        self.send({"type": "reseed_result", "id": req_id, "mixed_bytes": len(seed),
                   "credited_bits": credited, "repls_reseeded": sorted(reseeded),
                   "spares_reseeded": sorted(spares_reseeded), "clock_step_ms": clock_step_ms})
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

