"""Pure parts of exec_sandbox.vm.sandbox_vm: options validation and the machine description."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from exec_sandbox.host.runtime_dirs import sweep_stale_overlays
from exec_sandbox.vm.spec import (
    AGENT_PORT_NAME,
    PortForward,
    VmOptions,
    build_kernel_cmdline,
    build_machine_spec,
    build_user_net,
)
from smartvm.qemu import build_argv

BUNDLE_ARGS = "console=ttyS0 quiet reboot=t root=/dev/vda rw init=/sbin/init"


def spec_for(options: VmOptions, overlay: Path = Path("/run/x/ov.qcow2")):  # type: ignore[no-untyped-def]
    return build_machine_spec(
        kernel=Path("/k/vmlinux"),
        initrd=None,
        boot_args=BUNDLE_ARGS,
        needs_acpi=False,
        overlay=overlay,
        options=options,
        name="sbx-abc",
    )


def test_defaults_are_small_and_offline() -> None:
    options = VmOptions(language="python")
    assert (options.memory_mb, options.vcpus, options.network, options.port_forwards) == (256, 1, False, ())
    assert build_user_net(options) is None


def test_options_are_frozen_and_strict() -> None:
    options = VmOptions(language="raw")
    with pytest.raises(ValidationError):
        options.memory_mb = 512  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        VmOptions.model_validate({"language": "python", "memroy_mb": 1})
    with pytest.raises(ValidationError, match="language"):
        VmOptions.model_validate({"language": "ruby"})
    with pytest.raises(ValidationError, match="environment variable"):
        VmOptions(language="python", env={"1BAD": "x"})
    with pytest.raises(ValidationError, match="kernel argument"):
        VmOptions(language="python", kernel_args=("a b",))


def test_kernel_cmdline_appends_or_replaces() -> None:
    options = VmOptions(language="python", kernel_args=("init=/bin/sh", "loglevel=7"))
    assert build_kernel_cmdline(BUNDLE_ARGS, options) == BUNDLE_ARGS + " init=/bin/sh loglevel=7"
    override = VmOptions(language="python", kernel_cmdline="console=ttyS0  root=/dev/vda")
    assert build_kernel_cmdline(BUNDLE_ARGS, override) == "console=ttyS0 root=/dev/vda"


def test_machine_spec_has_overlay_root_rng_and_no_network() -> None:
    spec = spec_for(VmOptions(language="python", memory_mb=512, vcpus=2))
    assert spec.memory_mib == 512 and spec.vcpus == 2 and spec.rng
    assert [(d.id, d.path, d.resolved_format, d.read_only) for d in spec.drives] == [
        ("root", Path("/run/x/ov.qcow2"), "qcow2", False)
    ]
    assert spec.user_net is None and spec.nics == ()
    argv = build_argv(spec)
    assert "virtio-rng-device,rng=rng0" in argv
    assert any("file=/run/x/ov.qcow2" in a for a in argv)
    assert AGENT_PORT_NAME == "org.exec_sandbox.agent"


def test_port_forwards_without_network_are_restricted() -> None:
    options = VmOptions(language="python", port_forwards=(PortForward(guest_port=8000, host_port=18000),))
    net = build_user_net(options)
    assert net is not None and net.restrict
    assert [(f.host_addr, f.host_port, f.guest_port) for f in net.hostfwd] == [("127.0.0.1", 18000, 8000)]
    open_net = build_user_net(VmOptions(language="python", network=True))
    assert open_net is not None and not open_net.restrict


def test_sweep_removes_only_overlays_of_dead_processes(tmp_path: Path) -> None:
    import os

    from smartvm.leftovers import OwnerRecord, new_owner_record, write_sidecar_record

    mine = tmp_path / f"sbx-{os.getpid()}-vm1.qcow2"
    dead = tmp_path / "sbx-999999999-vm2.qcow2"
    other = tmp_path / "unrelated.qcow2"
    for path in (mine, dead, other):
        path.write_bytes(b"x")
    # The owner record beside each overlay (smartvm.leftovers) says whose it is.
    write_sidecar_record(mine, new_owner_record("vm1", kind="overlay"))
    write_sidecar_record(dead, OwnerRecord("vm2", 999999999, 1, kind="overlay"))
    assert sweep_stale_overlays(tmp_path) == [dead]
    assert mine.exists() and other.exists() and not dead.exists()
