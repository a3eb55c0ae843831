"""NetworkManager: guest addressing (pure) plus the host bridge and TAPs (netlink), for one subnet.

    nm = NetworkManager("172.16.0.0/24", "smartvm0")
    async with nm:                                   # cleanup() on exit
        tap = await nm.create_tap("vm-1", "eth0")    # bridge + TAP + IP, all undone by cleanup()
        boot_args += " " + nm.get_guest_network_boot_args(tap)

The gateway is the subnet's first host address and lives on the bridge; guests get addresses from
the second one on. Pure calls (``allocate_ip``, ``generate_mac``...) never touch the host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from smartvm.errors import SmartVMError
from smartvm.network.addressing import (
    IpPool,
    TapInfo,
    build_guest_ip_boot_arg,
    generate_mac,
    generate_tap_name,
    parse_subnet,
    validate_interface_name,
)
from smartvm.network.netlink import HostNetwork

__all__ = ["DEFAULT_BRIDGE_NAME", "DEFAULT_SUBNET", "NetworkManager"]

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "172.16.0.0/24"
DEFAULT_BRIDGE_NAME = "smartvm0"


class NetworkManager:
    """Owns one guest subnet, its bridge and the TAPs created through it."""

    def __init__(
        self,
        subnet: str = DEFAULT_SUBNET,
        bridge_name: str = DEFAULT_BRIDGE_NAME,
        *,
        netns: str | None = None,
    ) -> None:
        self._subnet = parse_subnet(subnet)
        self._bridge_name = validate_interface_name(bridge_name, what="bridge name")
        self._pool = IpPool(self._subnet)
        self._host = HostNetwork(netns)
        self._taps: dict[str, TapInfo] = {}
        # Serialises host changes of this manager; created lazily so the manager may be built
        # outside any event loop.
        self._lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ properties

    @property
    def subnet(self) -> str:
        """The normalised subnet, e.g. ``"10.20.30.16/29"`` for input ``"10.20.30.17/29"``."""
        return self._subnet.cidr

    @property
    def gateway_ip(self) -> str:
        return str(self._subnet.gateway)

    @property
    def subnet_mask(self) -> str:
        return self._subnet.netmask

    @property
    def prefixlen(self) -> int:
        return self._subnet.prefixlen

    @property
    def bridge_name(self) -> str:
        return self._bridge_name

    @property
    def netns(self) -> str | None:
        return self._host.netns

    @property
    def allocated_ips(self) -> list[str]:
        return self._pool.allocated

    @property
    def taps(self) -> dict[str, TapInfo]:
        """TAPs created by this manager and not yet deleted, by name."""
        return dict(self._taps)

    # ------------------------------------------------------------------ pure

    def allocate_ip(self) -> str:
        """The lowest free guest address (released ones are reused); ``IP_EXHAUSTED`` when none is left."""
        return self._pool.allocate()

    def release_ip(self, ip: str) -> None:
        """Free ``ip``; ``INVALID_IP`` if it is malformed, outside the subnet or not allocated."""
        self._pool.release(ip)

    def generate_mac(self, vm_id: str, iface_id: str) -> str:
        return generate_mac(vm_id, iface_id)

    def generate_tap_name(self, vm_id: str, iface_id: str) -> str:
        return generate_tap_name(vm_id, iface_id)

    def get_guest_network_boot_args(
        self, tap: TapInfo | Mapping[str, Any], guest_device: str = "eth0"
    ) -> str:
        """``ip=<guest>::<gateway>:<mask>::<device>:off`` for the guest kernel command line."""
        return build_guest_ip_boot_arg(TapInfo.coerce(tap), guest_device)

    # ------------------------------------------------------------------ host side effects

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def ensure_bridge(self) -> None:
        """Create the bridge (if missing), give it the gateway address and bring it up. Idempotent."""
        async with self._get_lock():
            await self._host.ensure_bridge(self._bridge_name, self.gateway_ip, self.prefixlen)

    async def create_tap(self, vm_id: str, iface_id: str) -> TapInfo:
        """Allocate an address and create, attach and bring up the TAP for (vm, interface).

        Calling it again for the same pair returns the same TapInfo. On failure nothing is left behind:
        the TAP is deleted and the address released.
        """
        tap_name = generate_tap_name(vm_id, iface_id)
        mac = generate_mac(vm_id, iface_id)
        async with self._get_lock():
            existing = self._taps.get(tap_name)
            if existing is not None:
                return existing
            await self._host.ensure_bridge(self._bridge_name, self.gateway_ip, self.prefixlen)
            guest_ip = self._pool.allocate()
            try:
                await self._host.create_tap(tap_name, self._bridge_name)
            except BaseException:
                self._pool.release(guest_ip)
                # HostNetwork rolls back its own failures; this covers a cancellation that arrived
                # while the TAP was being made (the thread finished, the caller went away).
                try:
                    await self._host.delete_tap(tap_name)
                except SmartVMError as undo_exc:
                    log.warning("could not remove TAP %s after a failed create: %s", tap_name, undo_exc)
                raise
            info = TapInfo(
                tap_name=tap_name,
                guest_ip=guest_ip,
                gateway_ip=self.gateway_ip,
                subnet_mask=self.subnet_mask,
                mac=mac,
            )
            self._taps[tap_name] = info
            return info

    async def delete_tap(self, tap_name: str) -> None:
        """Delete a TAP made by :meth:`create_tap` and release its address. Unknown names are a no-op."""
        validate_interface_name(tap_name, what="TAP name")
        async with self._get_lock():
            info = self._taps.pop(tap_name, None)
            if info is None:
                return
            # Released first: the address is free even if the kernel refuses the deletion.
            self._pool.release(info.guest_ip)
            await self._host.delete_tap(tap_name)

    async def cleanup(self) -> None:
        """Delete every TAP and the bridge this manager created, newest first. Idempotent.

        Addresses taken with :meth:`allocate_ip` directly (not through a TAP) stay allocated.
        """
        async with self._get_lock():
            for info in self._taps.values():
                self._pool.release(info.guest_ip)
            self._taps.clear()
            await self._host.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cleanup()

    def __repr__(self) -> str:
        return (
            f"NetworkManager(subnet={self.subnet!r}, bridge_name={self._bridge_name!r}, "
            f"netns={self.netns!r}, taps={len(self._taps)})"
        )
