"""Real bridge and TAP devices through NetworkManager, inside network namespaces these tests create.

Every check of the kernel's state goes through ``ip -n <ns> -j`` (iproute2), not through the code under
test. Nothing here touches an interface outside a namespace the test made; each namespace is deleted
in the fixture's finalisation, whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smartvm.errors import SmartVMError
from smartvm.network import NetworkManager

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root"),
    pytest.mark.skipif(
        shutil.which("ip") is None, reason="iproute2 'ip' is needed to verify the kernel state"
    ),
]

BRIDGE = "svbrtest0"
SUBNET = "10.231.7.0/24"


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{argv} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def netns_list() -> set[str]:
    return {entry.split()[0] for entry in _ip("netns", "list").splitlines() if entry.strip()}


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    """A fresh, uniquely named network namespace, deleted on exit even when the body raises."""
    name = f"smartvm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(scratch_netns())


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    return make_netns()


def links(ns: str | None) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(_ip("-j", "-d", "link", "show", netns=ns))}


def ipv4_addresses(ns: str, ifname: str) -> list[str]:
    # With -4, an interface without IPv4 addresses is left out of the list entirely.
    entries = json.loads(_ip("-j", "-4", "addr", "show", "dev", ifname, netns=ns))
    return [f"{a['local']}/{a['prefixlen']}" for entry in entries for a in entry.get("addr_info", [])]


def assert_only_loopback(ns: str) -> None:
    assert set(links(ns)) == {"lo"}


def assert_host_untouched(*names: str) -> None:
    host = links(None)
    for name in names:
        assert name not in host, f"{name} leaked into the host namespace"


def assert_tap_attached_and_up(ns: str, tap_name: str, bridge: str = BRIDGE) -> None:
    link = links(ns)[tap_name]
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == "tap"
    assert link.get("master") == bridge
    assert "UP" in link["flags"]


# ---------------------------------------------------------------- the happy path


async def test_bridge_and_two_taps_are_created_attached_up_and_cleaned(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    await nm.ensure_bridge()
    bridge = links(netns)[BRIDGE]
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in bridge["flags"]
    assert ipv4_addresses(netns, BRIDGE) == ["10.231.7.1/24"]

    tap1 = await nm.create_tap("vm-alpha", "eth0")
    tap2 = await nm.create_tap("vm-beta", "eth0")
    assert (tap1.guest_ip, tap2.guest_ip) == ("10.231.7.2", "10.231.7.3")
    for tap, vm in ((tap1, "vm-alpha"), (tap2, "vm-beta")):
        assert tap.tap_name == nm.generate_tap_name(vm, "eth0")
        assert tap.mac == nm.generate_mac(vm, "eth0")
        assert (tap.gateway_ip, tap.subnet_mask) == ("10.231.7.1", "255.255.255.0")
        assert_tap_attached_and_up(netns, tap.tap_name)
    assert set(links(netns)) == {"lo", BRIDGE, tap1.tap_name, tap2.tap_name}
    assert nm.get_guest_network_boot_args(tap2) == "ip=10.231.7.3::10.231.7.1:255.255.255.0::eth0:off"
    assert_host_untouched(BRIDGE, tap1.tap_name, tap2.tap_name)

    await nm.cleanup()
    assert_only_loopback(netns)
    assert nm.taps == {}
    assert nm.allocated_ips == []
    assert netns in netns_list()  # cleanup removes our interfaces, never the namespace itself


async def test_every_change_is_registered_for_undo_in_order(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    tap = await nm.create_tap("vm-undo", "eth0")
    descriptions = [entry.description for entry in nm._host.undo_entries]
    assert descriptions == [
        f"delete bridge {BRIDGE}",
        f"remove 10.231.7.1/24 from {BRIDGE}",
        f"set {BRIDGE} down",
        f"delete TAP {tap.tap_name}",
    ]
    await nm.cleanup()
    assert nm._host.undo_entries == []
    assert_only_loopback(netns)


async def test_async_with_cleans_up_on_error(netns: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with NetworkManager(SUBNET, BRIDGE, netns=netns) as nm:
            tap = await nm.create_tap("vm-ctx", "eth0")
            assert_tap_attached_and_up(netns, tap.tap_name)
            raise RuntimeError("boom")
    assert_only_loopback(netns)


# ---------------------------------------------------------------- idempotency, release and reuse


async def test_operations_are_idempotent(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    await nm.ensure_bridge()
    await nm.ensure_bridge()
    assert ipv4_addresses(netns, BRIDGE) == ["10.231.7.1/24"]

    first = await nm.create_tap("vm-idem", "eth0")
    again = await nm.create_tap("vm-idem", "eth0")
    assert again == first
    assert nm.allocated_ips == ["10.231.7.2"]
    assert set(links(netns)) == {"lo", BRIDGE, first.tap_name}

    await nm.delete_tap(first.tap_name)
    await nm.delete_tap(first.tap_name)
    assert set(links(netns)) == {"lo", BRIDGE}
    assert nm.allocated_ips == []

    await nm.cleanup()
    await nm.cleanup()
    assert_only_loopback(netns)

    # A cleaned-up manager can be used again.
    tap = await nm.create_tap("vm-idem", "eth0")
    assert tap.guest_ip == "10.231.7.2"
    assert_tap_attached_and_up(netns, tap.tap_name)
    await nm.cleanup()
    assert_only_loopback(netns)


async def test_delete_tap_releases_its_ip_for_reuse(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    a = await nm.create_tap("vm-a", "eth0")
    b = await nm.create_tap("vm-b", "eth0")
    await nm.delete_tap(a.tap_name)
    assert a.tap_name not in links(netns)
    assert_tap_attached_and_up(netns, b.tap_name)
    c = await nm.create_tap("vm-c", "eth0")
    assert c.guest_ip == a.guest_ip == "10.231.7.2"
    assert set(nm.taps) == {b.tap_name, c.tap_name}
    await nm.cleanup()
    assert_only_loopback(netns)


async def test_concurrent_create_taps_get_distinct_addresses(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    taps = await asyncio.gather(*(nm.create_tap(f"vm-{i}", "eth0") for i in range(4)))
    assert sorted(t.guest_ip for t in taps) == [f"10.231.7.{n}" for n in range(2, 6)]
    for tap in taps:
        assert_tap_attached_and_up(netns, tap.tap_name)
    await nm.cleanup()
    assert_only_loopback(netns)


async def test_exhausted_subnet_creates_no_tap(netns: str) -> None:
    nm = NetworkManager("10.231.8.0/30", BRIDGE, netns=netns)
    tap = await nm.create_tap("vm-only", "eth0")
    with pytest.raises(SmartVMError) as info:
        await nm.create_tap("vm-extra", "eth0")
    assert info.value.code == "IP_EXHAUSTED"
    assert set(links(netns)) == {"lo", BRIDGE, tap.tap_name}
    await nm.cleanup()
    assert_only_loopback(netns)


# ---------------------------------------------------------------- failures leave nothing behind


async def test_invalid_input_is_rejected_before_any_change(netns: str) -> None:
    with pytest.raises(SmartVMError) as info:
        NetworkManager(SUBNET, "bad bridge", netns=netns)
    assert info.value.code == "INVALID_INTERFACE_NAME"
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    with pytest.raises(SmartVMError) as info:
        await nm.create_tap("", "eth0")
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SmartVMError) as info:
        await nm.delete_tap("no/such")
    assert info.value.code == "INVALID_INTERFACE_NAME"
    assert_only_loopback(netns)
    assert nm.allocated_ips == []


async def test_foreign_interface_with_tap_name_is_never_adopted_or_deleted(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    squatter = nm.generate_tap_name("vm-squat", "eth0")
    _ip("link", "add", squatter, "type", "veth", "peer", "name", "svpeer0", netns=netns)

    with pytest.raises(SmartVMError) as info:
        await nm.create_tap("vm-squat", "eth0")
    assert info.value.code == "NETWORK_SETUP_FAILED"
    assert info.value.details["interface"] == squatter
    assert info.value.details["errno"] == 17  # EEXIST
    assert info.value.details["netns"] == netns
    assert nm.allocated_ips == []
    assert nm.taps == {}
    assert links(netns)[squatter]["linkinfo"]["info_kind"] == "veth"

    await nm.cleanup()
    assert set(links(netns)) == {"lo", squatter, "svpeer0"}


async def test_bridge_name_taken_by_non_bridge_fails_without_changes(netns: str) -> None:
    _ip("link", "add", BRIDGE, "type", "veth", "peer", "name", "svpeer1", netns=netns)
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    with pytest.raises(SmartVMError) as info:
        await nm.create_tap("vm-x", "eth0")
    assert info.value.code == "NETWORK_SETUP_FAILED"
    assert info.value.details["interface"] == BRIDGE
    assert "'veth'" in info.value.message
    assert set(links(netns)) == {"lo", BRIDGE, "svpeer1"}
    assert ipv4_addresses(netns, BRIDGE) == []
    assert "UP" not in links(netns)[BRIDGE]["flags"]
    assert nm.allocated_ips == []
    await nm.cleanup()
    assert set(links(netns)) == {"lo", BRIDGE, "svpeer1"}


async def test_pre_existing_bridge_is_reused_and_only_our_changes_reverted(netns: str) -> None:
    _ip("link", "add", BRIDGE, "type", "bridge", netns=netns)
    _ip("addr", "add", "192.0.2.1/24", "dev", BRIDGE, netns=netns)
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    tap = await nm.create_tap("vm-shared", "eth0")
    assert sorted(ipv4_addresses(netns, BRIDGE)) == ["10.231.7.1/24", "192.0.2.1/24"]
    assert "UP" in links(netns)[BRIDGE]["flags"]
    assert_tap_attached_and_up(netns, tap.tap_name)

    await nm.cleanup()
    assert set(links(netns)) == {"lo", BRIDGE}
    assert ipv4_addresses(netns, BRIDGE) == ["192.0.2.1/24"]
    assert "UP" not in links(netns)[BRIDGE]["flags"]


async def test_cancelled_create_tap_leaves_nothing_behind(netns: str) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    await nm.ensure_bridge()
    for attempt in range(5):
        task = asyncio.create_task(nm.create_tap(f"vm-cancel-{attempt}", "eth0"))
        # Let the task reach a different point each round, then cancel it wherever it is.
        for _ in range(attempt):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.cancelled():
            assert nm.taps == {}
            assert nm.allocated_ips == []
            assert set(links(netns)) == {"lo", BRIDGE}
        else:
            # It finished before the cancellation landed: it must then be complete and tracked.
            tap = task.result()
            assert_tap_attached_and_up(netns, tap.tap_name)
            await nm.delete_tap(tap.tap_name)
    await nm.cleanup()
    assert_only_loopback(netns)


async def test_cancel_after_tap_was_made_removes_it(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel exactly while the worker thread holds a freshly made TAP (gated, the netlink work is real)."""
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    made, release = threading.Event(), threading.Event()
    real = nm._host._create_tap_sync

    def gated(name: str, bridge: str) -> None:
        real(name, bridge)
        made.set()
        release.wait(30)

    monkeypatch.setattr(nm._host, "_create_tap_sync", gated)
    tap_name = nm.generate_tap_name("vm-gated", "eth0")
    task = asyncio.create_task(nm.create_tap("vm-gated", "eth0"))
    assert await asyncio.to_thread(made.wait, 30)
    assert_tap_attached_and_up(netns, tap_name)  # the kernel has it; the caller does not know yet
    task.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tap_name not in links(netns)
    assert nm.taps == {}
    assert nm.allocated_ips == []
    assert [e.description for e in nm._host.undo_entries] == [
        f"delete bridge {BRIDGE}",
        f"remove 10.231.7.1/24 from {BRIDGE}",
        f"set {BRIDGE} down",
    ]
    await nm.cleanup()
    assert_only_loopback(netns)


async def test_cancel_during_bridge_setup_is_undone_by_cleanup(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nm = NetworkManager(SUBNET, BRIDGE, netns=netns)
    made, release = threading.Event(), threading.Event()
    real = nm._host._ensure_bridge_sync

    def gated(name: str, gateway_ip: str, prefixlen: int) -> None:
        real(name, gateway_ip, prefixlen)
        made.set()
        release.wait(30)

    monkeypatch.setattr(nm._host, "_ensure_bridge_sync", gated)
    task = asyncio.create_task(nm.ensure_bridge())
    assert await asyncio.to_thread(made.wait, 30)
    task.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The bridge finished being made after the caller left; its undo was registered all the same.
    assert BRIDGE in links(netns)
    await nm.cleanup()
    assert_only_loopback(netns)


async def test_missing_namespace_is_a_typed_error_and_is_not_created() -> None:
    ghost = f"smartvm-test-ghost-{uuid.uuid4().hex[:8]}"
    nm = NetworkManager(SUBNET, BRIDGE, netns=ghost)
    with pytest.raises(SmartVMError) as info:
        await nm.ensure_bridge()
    assert info.value.code == "NETWORK_SETUP_FAILED"
    assert info.value.details["errno"] == 2
    assert ghost not in netns_list()


# ---------------------------------------------------------------- isolation and the fixture itself


async def test_managers_in_two_namespaces_are_isolated(make_netns: Callable[[], str]) -> None:
    ns_a, ns_b = make_netns(), make_netns()
    nm_a = NetworkManager(SUBNET, BRIDGE, netns=ns_a)
    nm_b = NetworkManager(SUBNET, BRIDGE, netns=ns_b)
    tap_a = await nm_a.create_tap("vm-same", "eth0")
    tap_b = await nm_b.create_tap("vm-same", "eth0")
    assert tap_a == tap_b  # same inputs, same addressing: isolation comes from the namespaces
    await nm_a.cleanup()
    assert_only_loopback(ns_a)
    assert_tap_attached_and_up(ns_b, tap_b.tap_name)
    await nm_b.cleanup()
    assert_only_loopback(ns_b)
    assert_host_untouched(BRIDGE, tap_a.tap_name)


def test_scratch_namespace_is_removed_even_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="test body failed"), scratch_netns() as ns:
        _ip("link", "add", "svleft0", "type", "bridge", netns=ns)
        assert ns in netns_list()
        raise RuntimeError("test body failed")
    assert ns not in netns_list()
