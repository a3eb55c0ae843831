"""Host network side effects through netlink (pyroute2): a bridge, TAP devices, undone in reverse.

:class:`HostNetwork` is the only place in :mod:`smartvm` that changes host interfaces. Every change
it makes (a created link, an added address, a link brought up) is pushed onto an undo stack *in the
same worker thread, right after the kernel accepted it*, so the stack is exact even when the awaiting
task is cancelled half-way. Undo entries run once, in reverse order, on :meth:`HostNetwork.delete_tap`
(for that TAP) or :meth:`HostNetwork.cleanup` (everything). Interfaces this object did not create are
never deleted; a pre-existing bridge is reused and only the changes made to it are reverted.

pyroute2 calls block, so each operation runs in a thread (:func:`asyncio.to_thread`) with its own
netlink socket. With ``netns="name"`` every socket is opened inside that named network namespace
(``/var/run/netns/<name>``), which must already exist: it is never created here.

Errors: netlink and OS errors become ``SmartVMError(code="NETWORK_SETUP_FAILED")`` whose ``details``
carry ``operation``, ``interface``, ``errno`` and ``netns``. A failed operation rolls back what it
changed before raising.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from smartvm.cleanup import shielded
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.network.addressing import validate_interface_name

__all__ = ["NETNS_RUN_DIR", "HostNetwork", "UndoEntry"]

log = logging.getLogger(__name__)

NETNS_RUN_DIR = "/var/run/netns"
"""Where ``ip netns add`` and pyroute2 bind-mount named network namespaces."""

_IFF_UP = 0x1

_T = TypeVar("_T")
# An undo action gets the netlink socket of the operation running it.
UndoAction = Callable[[Any], None]


@dataclass(eq=False)
class UndoEntry:
    """One registered undo: ``key`` groups the entries of one TAP (``tap:<name>``) or bridge."""

    key: str
    description: str
    action: UndoAction = field(repr=False)


class _UndoStack:
    """Thread-safe LIFO of undo entries; entries are removed before they run, so each runs once."""

    def __init__(self) -> None:
        self._entries: list[UndoEntry] = []
        self._lock = threading.Lock()

    def push(self, key: str, description: str, action: UndoAction) -> UndoEntry:
        entry = UndoEntry(key, description, action)
        with self._lock:
            self._entries.append(entry)
        return entry

    def take(self, predicate: Callable[[UndoEntry], bool]) -> list[UndoEntry]:
        """Remove the matching entries and return them newest first (the order to run them in)."""
        with self._lock:
            taken = [e for e in self._entries if predicate(e)]
            self._entries = [e for e in self._entries if not predicate(e)]
        return taken[::-1]

    def snapshot(self) -> list[UndoEntry]:
        with self._lock:
            return list(self._entries)


def _validate_netns(netns: object) -> None:
    if netns is None:
        return
    reason: str | None = None
    if not isinstance(netns, str) or not netns or "\0" in netns:
        reason = "must be a non-empty string"
    elif not os.path.isabs(netns) and ("/" in netns or netns in {".", ".."} or netns != netns.strip()):
        reason = "a namespace name must not contain '/' or surrounding spaces; give an absolute path instead"
    if reason is not None:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"invalid netns {netns!r}: {reason}", details={"netns": netns}
        )


def _tap_key(name: str) -> str:
    return f"tap:{name}"


def _bridge_key(name: str) -> str:
    return f"bridge:{name}"


class HostNetwork:
    """Creates a bridge and TAP devices (in ``netns`` if given) and undoes exactly what it did."""

    def __init__(self, netns: str | None = None) -> None:
        _validate_netns(netns)
        self._netns = netns
        self._undo = _UndoStack()

    @property
    def netns(self) -> str | None:
        return self._netns

    @property
    def undo_entries(self) -> list[UndoEntry]:
        """Pending undo entries, oldest first (what :meth:`cleanup` would revert, in reverse)."""
        return self._undo.snapshot()

    # ------------------------------------------------------------------ async API

    async def ensure_bridge(self, name: str, gateway_ip: str, prefixlen: int) -> None:
        """Make bridge ``name`` exist, carry ``gateway_ip/prefixlen`` and be up. Idempotent."""
        validate_interface_name(name, what="bridge name")
        try:
            interface = ipaddress.IPv4Interface(f"{gateway_ip}/{prefixlen}")
        except ValueError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_IP,
                f"invalid gateway address {gateway_ip!r}/{prefixlen!r} for bridge {name!r}",
                details={"ip": gateway_ip, "prefixlen": prefixlen, "interface": name},
            ) from exc
        await self._in_thread(self._ensure_bridge_sync, name, str(interface.ip), interface.network.prefixlen)

    async def create_tap(self, name: str, bridge: str) -> None:
        """Create TAP ``name``, attach it to ``bridge`` and bring it up; roll back on any failure.

        A link that already exists under that name is never adopted (it is not ours to delete later).
        """
        validate_interface_name(name, what="TAP name")
        validate_interface_name(bridge, what="bridge name")
        await self._in_thread(self._create_tap_sync, name, bridge)

    async def delete_tap(self, name: str) -> None:
        """Undo everything done for TAP ``name``. A TAP this object did not create is left alone."""
        validate_interface_name(name, what="TAP name")
        key = _tap_key(name)
        entries = self._undo.take(lambda e: e.key == key)
        if entries:
            await self._in_thread(self._run_undo_sync, entries)

    async def cleanup(self) -> None:
        """Undo every change still registered, newest first. Idempotent; safe after failures."""
        entries = self._undo.take(lambda e: True)
        if entries:
            await self._in_thread(self._run_undo_sync, entries)

    async def _in_thread(self, fn: Callable[..., _T], /, *args: Any) -> _T:
        # A netlink call cannot be interrupted. Wait until it is over so that whatever it changed
        # is on the undo stack before the caller's cleanup runs, then let the cancellation go on.
        return await shielded(asyncio.to_thread(fn, *args))

    # ------------------------------------------------------------------ sync, in worker threads

    def _fail(self, operation: str, interface: str, code: int | None, reason: str) -> SmartVMError:
        where = f" in netns {self._netns!r}" if self._netns else ""
        return SmartVMError(
            ErrorCode.NETWORK_SETUP_FAILED,
            f"{operation} {interface!r}{where} failed: {reason}",
            details={"operation": operation, "interface": interface, "errno": code, "netns": self._netns},
        )

    @contextmanager
    def _errors(self, operation: str, interface: str) -> Iterator[None]:
        try:
            yield
        except NetlinkError as exc:
            raise self._fail(
                operation, interface, exc.code, f"{os.strerror(exc.code)} (errno {exc.code})"
            ) from exc
        except OSError as exc:
            raise self._fail(operation, interface, exc.errno, str(exc)) from exc

    def _open(self, operation: str, interface: str) -> Any:
        if self._netns is not None:
            path = self._netns if os.path.isabs(self._netns) else os.path.join(NETNS_RUN_DIR, self._netns)
            # Checked here because pyroute2 leaks a socket and an event loop when the open fails.
            if not os.path.exists(path):
                raise self._fail(
                    operation, interface, errno_mod.ENOENT, f"network namespace {path} does not exist"
                )
        with self._errors(operation, interface):
            # flags=0: never create the namespace as a side effect of opening a socket in it.
            return NetNS(self._netns, flags=0) if self._netns is not None else IPRoute()

    @staticmethod
    def _lookup(ipr: Any, name: str) -> Any | None:
        indexes = ipr.link_lookup(ifname=name)
        if not indexes:
            return None
        links = ipr.get_links(indexes[0])
        return links[0] if links else None

    @staticmethod
    def _kind(link: Any) -> str | None:
        info = link.get_attr("IFLA_LINKINFO")
        return None if info is None else info.get_attr("IFLA_INFO_KIND")

    def _rollback(self, ipr: Any, made: list[UndoEntry]) -> None:
        made_ids = {id(e) for e in made}
        entries = self._undo.take(lambda e: id(e) in made_ids)
        failures = self._undo_entries(ipr, entries)
        for entry, exc in failures:
            log.warning("rollback step %r failed: %s", entry.description, exc)

    def _ensure_bridge_sync(self, name: str, gateway_ip: str, prefixlen: int) -> None:
        key = _bridge_key(name)
        made: list[UndoEntry] = []
        with self._open("open netlink for bridge", name) as ipr:
            try:
                link = self._lookup(ipr, name)
                if link is None:
                    with self._errors("create bridge", name):
                        try:
                            ipr.link("add", ifname=name, kind="bridge")
                            made.append(self._undo.push(key, f"delete bridge {name}", _deleter(name)))
                        except NetlinkError as exc:
                            if exc.code != errno_mod.EEXIST:  # lost a race: someone else made it
                                raise
                    link = self._lookup(ipr, name)
                    if link is None:
                        raise self._fail(
                            "create bridge", name, errno_mod.ENODEV, "link vanished right after creation"
                        )
                if self._kind(link) != "bridge":
                    raise self._fail(
                        "use bridge",
                        name,
                        errno_mod.EEXIST,
                        f"an interface of kind {self._kind(link)!r} already has that name",
                    )
                index = link["index"]
                with self._errors("assign gateway address to bridge", name):
                    present = {
                        (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                        for a in ipr.get_addr(index=index, family=socket.AF_INET)
                    }
                    if (gateway_ip, prefixlen) not in present:
                        ipr.addr("add", index=index, address=gateway_ip, prefixlen=prefixlen)
                        made.append(
                            self._undo.push(
                                key,
                                f"remove {gateway_ip}/{prefixlen} from {name}",
                                _address_remover(name, gateway_ip, prefixlen),
                            )
                        )
                with self._errors("bring bridge up", name):
                    if not link["flags"] & _IFF_UP:
                        ipr.link("set", index=index, state="up")
                        made.append(self._undo.push(key, f"set {name} down", _downer(name)))
            except BaseException:
                self._rollback(ipr, made)
                raise

    def _create_tap_sync(self, name: str, bridge: str) -> None:
        key = _tap_key(name)
        made: list[UndoEntry] = []
        with self._open("open netlink for TAP", name) as ipr:
            try:
                bridge_link = self._lookup(ipr, bridge)
                if bridge_link is None or self._kind(bridge_link) != "bridge":
                    raise self._fail(
                        "attach TAP",
                        name,
                        errno_mod.ENODEV,
                        f"bridge {bridge!r} does not exist (call ensure_bridge first)",
                    )
                if self._lookup(ipr, name) is not None:
                    raise self._fail(
                        "create TAP",
                        name,
                        errno_mod.EEXIST,
                        "an interface with that name already exists and was not created by this manager",
                    )
                with self._errors("create TAP", name):
                    ipr.link("add", ifname=name, kind="tuntap", mode="tap")
                    made.append(self._undo.push(key, f"delete TAP {name}", _deleter(name)))
                tap = self._lookup(ipr, name)
                if tap is None:
                    raise self._fail(
                        "create TAP", name, errno_mod.ENODEV, "link vanished right after creation"
                    )
                with self._errors("attach TAP to bridge and bring it up", name):
                    ipr.link("set", index=tap["index"], master=bridge_link["index"], state="up")
            except BaseException:
                self._rollback(ipr, made)
                raise

    def _undo_entries(self, ipr: Any, entries: list[UndoEntry]) -> list[tuple[UndoEntry, BaseException]]:
        failures: list[tuple[UndoEntry, BaseException]] = []
        for entry in entries:
            try:
                entry.action(ipr)
            except (NetlinkError, OSError) as exc:
                failures.append((entry, exc))
        return failures

    def _run_undo_sync(self, entries: list[UndoEntry]) -> None:
        interface = entries[0].key.split(":", 1)[1]
        with self._open("open netlink for cleanup", interface) as ipr:
            failures = self._undo_entries(ipr, entries)
        if failures:
            first_entry, first_exc = failures[0]
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED,
                f"{len(failures)} of {len(entries)} undo steps failed; first: "
                f"{first_entry.description}: {first_exc}",
                details={
                    "operation": "undo",
                    "interface": first_entry.key.split(":", 1)[1],
                    "errno": getattr(first_exc, "code", getattr(first_exc, "errno", None)),
                    "netns": self._netns,
                    "failed_steps": [f"{e.description}: {x}" for e, x in failures],
                },
            ) from first_exc


# Undo actions look the link up by name at undo time and treat "already gone" as done, so running
# them after someone else removed the link (or twice) is harmless.


def _index_or_none(ipr: Any, name: str) -> int | None:
    indexes = ipr.link_lookup(ifname=name)
    return int(indexes[0]) if indexes else None


def _deleter(name: str) -> UndoAction:
    def delete(ipr: Any) -> None:
        index = _index_or_none(ipr, name)
        if index is None:
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno_mod.ENODEV:
                raise

    return delete


def _address_remover(name: str, address: str, prefixlen: int) -> UndoAction:
    def remove(ipr: Any) -> None:
        index = _index_or_none(ipr, name)
        if index is None:
            return
        try:
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code not in (errno_mod.ENODEV, errno_mod.EADDRNOTAVAIL):
                raise

    return remove


def _downer(name: str) -> UndoAction:
    def down(ipr: Any) -> None:
        index = _index_or_none(ipr, name)
        if index is None:
            return
        try:
            ipr.link("set", index=index, state="down")
        except NetlinkError as exc:
            if exc.code != errno_mod.ENODEV:
                raise

    return down
