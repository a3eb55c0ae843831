"""MicroVM creates TAPs for interfaces without ``host_dev_name`` and removes them on stop or failure.

Real TAPs and a real bridge, inside a network namespace the test creates and deletes;
the VMM is the fake Firecracker (it records the interface config it was given).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.microvm import MicroVM, MicroVMState
from smartvm.network import NetworkManager
from smartvm.transport import SocketClient
from tests.fake_firecracker.harness import Target, machine_for, make_fake_binary, make_target, short_tmp_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 'ip' is needed to inspect the namespace"),
]

SUBNET = "10.231.9.0/24"
BRIDGE = "svbrmvm0"


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)} failed: {done.stderr.strip()}"
    return done.stdout


def links(ns: str) -> set[str]:
    return {link["ifname"] for link in json.loads(ip("-n", ns, "-j", "link", "show"))}


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"smartvm-mvm-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def fake() -> Iterator[Target]:
    with short_tmp_dir() as workdir:
        yield make_target("fake", workdir)


async def test_taps_are_created_for_the_vm_and_removed_on_stop(netns: str, fake: Target) -> None:
    nm = NetworkManager(subnet=SUBNET, bridge_name=BRIDGE, netns=netns)
    config = fake.config(network_interfaces=[{"iface_id": "eth0"}])
    vm = MicroVM("net-vm", config, fake.binary, fake.socket_path, nm, backend=machine_for(fake))
    try:
        await vm.start()
        (tap,) = vm.taps
        assert tap.tap_name == nm.generate_tap_name("net-vm", "eth0")
        assert tap.tap_name in links(netns)
        async with SocketClient(fake.socket_path) as client:
            applied = await client.get("/vm/config")
        (iface,) = applied["network-interfaces"]
        assert iface == {"iface_id": "eth0", "host_dev_name": tap.tap_name, "guest_mac": tap.mac}
        boot_args = applied["boot-source"]["boot_args"]
        assert boot_args.endswith(f"ip={tap.guest_ip}::{tap.gateway_ip}:{tap.subnet_mask}::eth0:off")
        # The VM's own config is untouched: TAPs belong to this boot, not to the config.
        assert vm.config.config.network_interfaces[0].host_dev_name is None
    finally:
        await vm.stop()
    assert vm.taps == []
    assert tap.tap_name not in links(netns)
    assert nm.allocated_ips == []
    await nm.cleanup()


async def test_taps_are_removed_when_start_fails(netns: str, fake: Target) -> None:
    nm = NetworkManager(subnet=SUBNET, bridge_name=BRIDGE, netns=netns)
    knobs = fake.workdir / "knobs"
    knobs.mkdir()
    binary = make_fake_binary(knobs, "--exit-code", "5")
    config = fake.config(network_interfaces=[{"iface_id": "eth0"}, {"iface_id": "eth1"}])
    vm = MicroVM(
        "net-fail", config, binary, fake.socket_path, nm, backend=machine_for(fake, binary_path=binary)
    )
    with pytest.raises(SmartVMError) as info:
        await vm.start()
    assert info.value.code == ErrorCode.VMM_EXITED
    assert vm.state is MicroVMState.ERROR
    assert vm.taps == []
    assert not {nm.generate_tap_name("net-fail", i) for i in ("eth0", "eth1")} & links(netns)
    assert nm.allocated_ips == []
    await nm.cleanup()
