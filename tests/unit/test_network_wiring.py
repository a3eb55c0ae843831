"""The pure parts of the network wiring: the NIC's QEMU options, the per-call plan, the frame."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.egress import EgressGateway, Secret
from exec_sandbox.errors import SandboxInputError
from exec_sandbox.models import PortForward
from exec_sandbox.protocol.agent import NetConfigRequest, encode_request
from exec_sandbox.sandbox.network import plan_network
from exec_sandbox.vm.network import (
    EGRESS_ADDRESS,
    build_egress_user_net,
    concrete_forwards,
    guest_net_env,
)
from smartvm.qemu import GuestForward, QemuMachineSpec, build_argv

SRC = Path(__file__).resolve().parents[2] / "src"


def _netdev(spec: QemuMachineSpec) -> str:
    argv = build_argv(spec)
    return argv[argv.index("-netdev") + 1]


async def test_the_nic_reaches_only_the_gateway() -> None:
    policy = plan_network(SchedulerConfig(allowed_domains=["a.test"]))
    assert policy is not None
    gateway = EgressGateway(policy.policy)
    async with gateway:
        assert gateway.proxy_addresses is not None and gateway.dns_address is not None
        net = build_egress_user_net(gateway, [PortForward(guest_port=80, host_port=8080)],
                                    socat="/usr/bin/socat")
        netdev = _netdev(QemuMachineSpec(kernel=Path("/k"), user_net=net))
        proxy, dns_address = gateway.proxy_addresses, gateway.dns_address
    opts = netdev.split(",")
    assert opts[:3] == ["user", "id=usernet", "restrict=on"]  # the boundary
    assert "net=10.0.2.0/24" in opts and "ipv6=off" in opts and "hostfwd=tcp:127.0.0.1:8080-:80" in opts
    fwds = [o for o in opts if o.startswith("guestfwd=")]
    # exactly four exits, all to the gateway's own listeners on loopback, all TCP
    assert sorted(f.split("-cmd:")[0] for f in fwds) == sorted(
        f"guestfwd=tcp:{EGRESS_ADDRESS}:{p}" for p in (53, 80, 443, 3128))
    targets = {f.split("TCP4:")[1] for f in fwds}
    assert targets == {f"{h}:{p}" for h, p in (proxy.forward, proxy.tls, proxy.http, dns_address)}
    assert all(f.split("-cmd:")[1].startswith("/usr/bin/socat - TCP4:127.0.0.1:") for f in fwds)


async def test_with_a_runtime_dir_the_exits_are_private_unix_sockets(tmp_path: Path) -> None:
    plan = plan_network(SchedulerConfig(allowed_domains=["a.test"]))
    assert plan is not None
    gateway = EgressGateway(plan.policy, unix_parent=tmp_path)
    async with gateway:
        assert gateway.unix_dir is not None and gateway.proxy_addresses is None
        assert gateway.unix_dir.parent == tmp_path and gateway.unix_dir.stat().st_mode & 0o777 == 0o700
        net = build_egress_user_net(gateway, [], socat="/usr/bin/socat")
        commands = sorted(f.command for f in net.guestfwd)
        assert commands == sorted(f"/usr/bin/socat - UNIX-CONNECT:{gateway.unix_dir}/{name}.sock"
                                  for name in ("dns", "forward", "http", "tls"))
        unix_dir = gateway.unix_dir
    assert not unix_dir.exists()


def test_forwards_only_means_no_gateway_and_no_guestfwd() -> None:
    net = build_egress_user_net(None, [], socat=None)
    assert net.restrict and net.guestfwd == ()


def test_guestfwd_command_commas_are_escaped_and_lines_refused() -> None:
    fwd = GuestForward(guest_addr="10.0.2.9", guest_port=1, command="a,b")
    net = build_egress_user_net(None, [], socat=None).model_copy(update={"guestfwd": (fwd,)})
    spec = QemuMachineSpec(kernel=Path("/k"), user_net=net)
    assert "guestfwd=tcp:10.0.2.9:1-cmd:a,,b" in _netdev(spec)
    with pytest.raises(ValidationError):
        GuestForward(guest_addr="10.0.2.9", guest_port=1, command="a\nb")


def test_concrete_forwards_pick_free_ports() -> None:
    (fwd,) = concrete_forwards([PortForward(guest_port=80)])
    assert fwd.host_port > 0 and fwd.host_addr == "127.0.0.1"
    fixed = PortForward(guest_port=80, host_port=8081)
    assert concrete_forwards([fixed]) == (fixed,)


def test_no_network_is_the_default_and_imports_nothing_of_egress() -> None:
    assert plan_network(SchedulerConfig()) is None
    code = ("import sys, exec_sandbox.sandbox.scheduler as s\n"
            "from exec_sandbox.sandbox.network import plan_network\n"
            "from exec_sandbox.config import SchedulerConfig\n"
            "assert plan_network(SchedulerConfig()) is None\n"
            "print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'dns', 'h11'))\n"
            "      or m in ('exec_sandbox.egress.proxy', 'exec_sandbox.egress.gateway')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "[]", out.stdout


def test_plan_merges_config_and_call() -> None:
    config = SchedulerConfig(allowed_domains=["a.test"], host_overrides={"a.test": "127.0.0.1"},
                             secrets={"K": Secret(value="v", hosts=["a.test"])})  # type: ignore[arg-type]
    plan = plan_network(config)
    assert plan is not None and plan.policy.allowed_domains == ["a.test"] and "K" in plan.policy.secrets
    # per call: replaces the config's (here: forwards only, no gateway, no secrets)
    plan = plan_network(config, allowed_domains=[], secrets={}, port_forwards=[8000])
    assert plan is not None and not plan.policy.enabled and plan.forwards[0].guest_port == 8000
    limited = plan_network(SchedulerConfig(allowed_domains=["a.test"],
                                           egress_limits={"max_bytes_in": 1000, "max_connections": 3}))
    assert limited is not None and limited.policy.limits.max_bytes_in == 1000
    assert limited.policy.limits.max_connections == 3
    # network_enabled alone: a NIC with nothing behind it
    plan = plan_network(SchedulerConfig(network_enabled=True))
    assert plan is not None and not plan.policy.enabled and plan.forwards == ()


@pytest.mark.parametrize(
    ("config", "kwargs", "field"),
    [
        ({}, {"allowed_domains": ["*"]}, "allowed_domains"),
        ({}, {"port_forwards": ["99999"]}, "port_forwards"),
        ({}, {"allowed_domains": ["a.test"], "secrets": {"K": {"value": "v", "hosts": []}}},
         "secrets.K.hosts"),
        ({}, {"secrets": {"K": {"value": "v", "hosts": ["a.test"]}}}, "secrets"),
        ({"allowed_domains": ["a.test"], "host_overrides": {"a.test": "not-an-ip"}}, {}, "host_overrides"),
        ({"allowed_domains": ["a.test"], "egress_limits": {"max_connections": 0}}, {}, "limits"),
        ({"allowed_cidrs": ["10.0.0.0/33"]}, {}, "allowed_cidrs"),
    ],
)
def test_bad_plans_name_the_field(config: dict[str, object], kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        plan_network(SchedulerConfig(**config), **kwargs)  # type: ignore[arg-type]
    assert str(info.value.context["field"]).startswith(field), info.value.context


async def test_guest_env_has_proxies_placeholders_and_trust_only_with_a_bundle() -> None:
    plan = plan_network(SchedulerConfig(allowed_domains=["a.test"],
                                        secrets={"K": {"value": "real-value", "hosts": ["a.test"]}}))
    assert plan is not None
    gateway = EgressGateway(plan.policy)
    env = guest_net_env(gateway, ca_bundle=False)
    assert env["HTTPS_PROXY"] == f"http://{EGRESS_ADDRESS}:3128" == env["npm_config_https_proxy"]
    assert env["K"].startswith("sbx-secret-") and "real-value" not in repr(env)
    assert "SSL_CERT_FILE" not in env
    trusted = guest_net_env(gateway, ca_bundle=True)
    assert trusted["REQUESTS_CA_BUNDLE"] == trusted["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"


def test_net_config_frame_is_validated() -> None:
    frame = NetConfigRequest(id="1", address="10.0.2.15", prefix=24, nameserver=EGRESS_ADDRESS,
                             mac="02:aa:bb:cc:dd:ee")
    assert b'"type":"net_config"' in encode_request(frame)
    with pytest.raises(ValidationError):
        NetConfigRequest(id="1", address="10.0.2.15; reboot", prefix=24, nameserver=EGRESS_ADDRESS)
    with pytest.raises(ValidationError):
        NetConfigRequest(id="1", address="10.0.2.15", prefix=24, nameserver=EGRESS_ADDRESS, mac="AA:BB")


def test_a_secret_given_as_a_mapping_never_shows_in_the_config() -> None:
    config = SchedulerConfig(allowed_domains=["a.test"],
                             secrets={"K": {"value": "hunter2-x", "hosts": ["a.test"]}})
    assert "hunter2-x" not in repr(config) and "hunter2-x" not in config.model_dump_json()
    plan = plan_network(config)
    assert plan is not None and plan.policy.secrets["K"].value.get_secret_value() == "hunter2-x"
    assert hash(config) == hash(SchedulerConfig(allowed_domains=["a.test"],
                                                secrets={"K": {"value": "other", "hosts": ["a.test"]}}))


def test_the_snapshot_key_says_whether_there_is_a_nic() -> None:
    from exec_sandbox.vm.snapshot_entries import build_key_inputs
    from exec_sandbox.vm.spec import VmOptions

    class _File:
        sha256 = "0" * 64

    class _Manifest:
        recipe_hash = kernel_recipe_hash = "r"
        rootfs = kernel = _File()
        initrd = None
        boot_args = "console=ttyS0"

    def key(options: VmOptions) -> str:
        return build_key_inputs(options, _Manifest(), qemu_version="7.2", accelerator="tcg",  # type: ignore[arg-type]
                                warmup_spare=True).key()

    plain = VmOptions(language="python")
    assert key(plain) != key(plain.model_copy(update={"nic": True}))


def test_serve_metrics_sum_the_egress_of_live_sandboxes() -> None:
    from exec_sandbox.egress import EgressStats
    from exec_sandbox.server import metrics

    class Registry:
        def count(self) -> int:
            return 2

        def creating(self) -> int:
            return 0

        def paused_count(self) -> int:
            return 0

        def egress_stats(self) -> list[EgressStats]:
            return [EgressStats(connections_total=5, refused_total=2, bytes_in=100, bytes_out=7,
                                active_connections=1),
                    EgressStats(connections_total=1, bytes_in=1)]

    previous = metrics._COLLECTOR.registry
    metrics.bind(Registry())
    try:
        text = metrics.render()[0].decode()
    finally:
        metrics._COLLECTOR.registry = previous
    assert 'sbx_serve_egress_connections{outcome="allowed"} 4.0' in text
    assert 'sbx_serve_egress_connections{outcome="refused"} 2.0' in text
    assert 'sbx_serve_egress_bytes{direction="in"} 101.0' in text
    assert "sbx_serve_egress_active_connections 1.0" in text


async def test_settled_waits_for_open_connections_only_as_long_as_asked() -> None:
    import asyncio

    plan = plan_network(SchedulerConfig(allowed_domains=["a.test"]))
    assert plan is not None
    async with EgressGateway(plan.policy) as gateway:
        assert await gateway.settled(timeout=0.2)
        assert gateway.proxy_addresses is not None
        reader, writer = await asyncio.open_connection(*gateway.proxy_addresses.forward)
        for _ in range(100):  # the proxy counts it once its handler runs
            if gateway.stats.active_connections:
                break
            await asyncio.sleep(0.01)
        assert not await gateway.settled(timeout=0.2)
        writer.write(b"GET http://b.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n")  # refused at once
        assert b"403" in await reader.read(100)
        writer.close()
        assert await gateway.settled(timeout=2.0)
        assert [e.rule for e in gateway.egress_log()] == ["not_allowlisted"]
