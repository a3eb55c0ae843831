"""The pure argv builder and the Firecracker-config -> QEMU-spec mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from smartvm.config.models import VMConfigModel
from smartvm.errors import SmartVMError
from smartvm.qemu.argv import (
    DEFAULT_BOOT_ARGS,
    DriveSpec,
    HostForward,
    MemoryBackendSpec,
    QemuMachineSpec,
    SerialPortSpec,
    TapNicSpec,
    UserNetSpec,
    VsockSpec,
    build_argv,
    build_kernel_cmdline,
    exec_uri,
    spec_from_vmconfig,
)


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_minimal_spec_exact_argv() -> None:
    spec = QemuMachineSpec(kernel=Path("/k/vmlinux"), qmp_socket=Path("/run/x/qmp.sock"))
    assert build_argv(spec) == [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "microvm,acpi=off",
        "-accel",
        "tcg,tb-size=32",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "128M",
        "-kernel",
        "/k/vmlinux",
        "-append",
        DEFAULT_BOOT_ARGS,
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng0",
        "-chardev",
        "socket,id=qmp,path=/run/x/qmp.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-no-reboot",
    ]


def test_inherited_qmp_fd_is_a_monitor_before_the_listening_one() -> None:
    spec = QemuMachineSpec(kernel=Path("/k/vmlinux"), qmp_socket=Path("/run/x/qmp.sock"), qmp_fd=9)
    argv = build_argv(spec)
    assert _pairs(argv, "-chardev")[-2:] == [
        "socket,id=qmpfd,fd=9",
        "socket,id=qmp,path=/run/x/qmp.sock,server=on,wait=off",
    ]
    assert _pairs(argv, "-mon") == ["chardev=qmpfd,mode=control", "chardev=qmp,mode=control"]


def test_qmp_fd_must_be_a_descriptor_number() -> None:
    with pytest.raises(ValueError, match="qmp_fd"):
        QemuMachineSpec(kernel=Path("/k/vmlinux"), qmp_fd=-1)


def test_full_spec_devices_and_snapshot_flags() -> None:
    spec = QemuMachineSpec(
        name="vm-1",
        kernel=Path("/k"),
        initrd=Path("/i.cpio"),
        cmdline="console=ttyS0",
        vcpus=2,
        memory_mib=256,
        drives=(
            DriveSpec(id="rootfs", path=Path("/img/base.qcow2"), read_only=True),
            DriveSpec(id="data", path=Path("/img/data.img"), cache="unsafe", bps_total=1000, iops_total=10),
            DriveSpec(id="forced", path=Path("/img/x.bin"), format="qcow2"),
        ),
        nics=(TapNicSpec(id="eth0", tap="tap0", mac="02:00:00:00:00:01"),),
        user_net=UserNetSpec(restrict=True, hostfwd=(HostForward(host_port=8080, guest_port=80),)),
        serial_ports=(SerialPortSpec(name="org.smartvm.agent", socket_path=Path("/run/a,b.sock")),),
        vsock=VsockSpec(guest_cid=3),
        rng=False,
        memory_backend=MemoryBackendSpec(path=Path("/dev/shm/vm.ram"), share=True),
        incoming="defer",
        tb_size_mib=None,
        no_reboot=False,
    )
    argv = build_argv(spec, binary="/opt/qemu")
    assert argv[0] == "/opt/qemu"
    assert _pairs(argv, "-name") == ["vm-1"]
    assert _pairs(argv, "-machine") == ["microvm,acpi=off,memory-backend=mem"]
    assert _pairs(argv, "-accel") == ["tcg"]
    assert _pairs(argv, "-smp") == ["2"]
    assert _pairs(argv, "-m") == ["256M"]
    assert _pairs(argv, "-initrd") == ["/i.cpio"]
    assert (
        "-object" in argv and "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/vm.ram,share=on" in argv
    )
    assert _pairs(argv, "-drive") == [
        "id=rootfs,file=/img/base.qcow2,format=qcow2,if=none,readonly=on,cache=writeback",
        "id=data,file=/img/data.img,format=raw,if=none,readonly=off,cache=unsafe,"
        "throttling.bps-total=1000,throttling.iops-total=10",
        "id=forced,file=/img/x.bin,format=qcow2,if=none,readonly=off,cache=writeback",
    ]
    devices = _pairs(argv, "-device")
    # disks keep their order (root first => /dev/vda), each on its own virtio-mmio device
    assert devices[:3] == [
        "virtio-blk-device,drive=rootfs",
        "virtio-blk-device,drive=data",
        "virtio-blk-device,drive=forced",
    ]
    assert "virtio-net-device,netdev=eth0,mac=02:00:00:00:00:01" in devices
    assert "virtio-net-device,netdev=usernet" in devices
    assert "virtserialport,bus=vser0.0,chardev=vport0,name=org.smartvm.agent" in devices
    assert not any(d.startswith("virtio-rng") for d in devices)
    # vhost-vsock needs KVM: dropped under TCG
    assert not any("vsock" in d for d in devices)
    assert _pairs(argv, "-netdev") == [
        "tap,id=eth0,ifname=tap0,script=no,downscript=no",
        "user,id=usernet,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80",
    ]
    # a comma in a path is doubled, QEMU's escape
    assert "socket,id=vport0,path=/run/a,,b.sock,server=on,wait=off" in _pairs(argv, "-chardev")
    assert _pairs(argv, "-incoming") == ["defer"]
    assert "-no-reboot" not in argv


def test_kvm_uses_host_cpu_and_keeps_vsock() -> None:
    spec = QemuMachineSpec(kernel=Path("/k"), accel="kvm", vsock=VsockSpec(guest_cid=7), acpi=True)
    argv = build_argv(spec)
    assert _pairs(argv, "-accel") == ["kvm"]
    assert _pairs(argv, "-cpu") == ["host"]
    assert _pairs(argv, "-machine") == ["microvm,acpi=on"]
    assert "vhost-vsock-device,guest-cid=7" in _pairs(argv, "-device")


def test_spec_rejects_bad_input() -> None:
    with pytest.raises(ValidationError, match="unique"):
        QemuMachineSpec(
            kernel=Path("/k"),
            drives=(DriveSpec(id="a", path=Path("/x")), DriveSpec(id="a", path=Path("/y"))),
        )
    with pytest.raises(ValidationError):
        DriveSpec(id="bad id", path=Path("/x"))
    with pytest.raises(ValidationError):
        TapNicSpec(id="n", tap="tap0", mac="not-a-mac")
    with pytest.raises(ValidationError, match="single line"):
        QemuMachineSpec(kernel=Path("/k"), cmdline="a\nb")
    with pytest.raises(ValidationError):
        QemuMachineSpec(kernel=Path("/k"), vcpus=0)


def test_exec_uri_quotes_paths() -> None:
    assert exec_uri("cat >", Path("/tmp/snap dir/it's")) == "exec:cat > '/tmp/snap dir/it'\"'\"'s'"
    assert exec_uri("cat", Path("/plain")) == "exec:cat /plain"
    with pytest.raises(SmartVMError) as info:
        exec_uri("cat", Path("/bad\nname"))
    assert info.value.code == "INVALID_ARGUMENT"


def test_cmdline_defaults_root_and_tcg_hints() -> None:
    assert build_kernel_cmdline(None, accel="kvm") == DEFAULT_BOOT_ARGS
    tcg = build_kernel_cmdline("console=ttyS0 reboot=k", tsc_khz=3_000_000)
    assert tcg == "console=ttyS0 reboot=t tsc_early_khz=3000000 lpj=12000000 no_timer_check"
    # given hints are not repeated
    assert build_kernel_cmdline("lpj=1 no_timer_check tsc_early_khz=5", accel="tcg") == (
        "lpj=1 no_timer_check tsc_early_khz=5"
    )


def _config(**sections: object) -> VMConfigModel:
    return VMConfigModel.model_validate(sections)


def test_spec_from_vmconfig_maps_firecracker_fields() -> None:
    config = _config(
        boot_source={"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0", "initrd_path": "/k/i"},
        machine_config={"vcpu_count": 2, "mem_size_mib": 256, "smt": False},
        drives=[
            {
                "drive_id": "scratch",
                "path_on_host": "/d/s.img",
                "is_root_device": False,
                "cache_type": "Unsafe",
            },
            {
                "drive_id": "rootfs",
                "path_on_host": "/d/root.qcow2",
                "is_root_device": True,
                "is_read_only": True,
                "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}},
            },
        ],
        network_interfaces=[{"iface_id": "eth0", "host_dev_name": "tap7", "guest_mac": "02:fc:00:00:00:07"}],
        vsock={"guest_cid": 3, "uds_path": "/tmp/v.sock"},
    )
    spec = spec_from_vmconfig(config, accel="kvm", name="vm")
    assert spec.kernel == Path("/k/vmlinux") and spec.initrd == Path("/k/i")
    assert spec.vcpus == 2 and spec.memory_mib == 256 and spec.accel == "kvm"
    # root drive first (it becomes /dev/vda), like Firecracker
    assert [d.id for d in spec.drives] == ["rootfs", "scratch"]
    assert spec.drives[0].read_only and spec.drives[0].resolved_format == "qcow2"
    assert spec.drives[0].bps_total == 10485760
    assert spec.drives[1].cache == "unsafe" and spec.drives[1].resolved_format == "raw"
    assert spec.cmdline == "console=ttyS0 root=/dev/vda ro"
    assert spec.nics == (TapNicSpec(id="eth0", tap="tap7", mac="02:fc:00:00:00:07"),)
    assert spec.vsock == VsockSpec(guest_cid=3)
    assert spec.rng


def test_spec_from_vmconfig_partuuid_rw_and_errors() -> None:
    config = _config(
        boot_source={"kernel_image_path": "/k"},
        drives=[{"drive_id": "r", "path_on_host": "/r.img", "is_root_device": True, "partuuid": "abcd-01"}],
    )
    spec = spec_from_vmconfig(config, tsc_khz=2_000_000)
    assert not spec.acpi and spec_from_vmconfig(config, acpi=True).acpi
    assert (
        spec.cmdline
        == f"{DEFAULT_BOOT_ARGS} root=PARTUUID=abcd-01 rw tsc_early_khz=2000000 lpj=8000000 no_timer_check"
    )

    class Wrapper:  # anything with a typed `.config`, like smartvm.config.VMConfig
        def __init__(self, model: VMConfigModel) -> None:
            self.config = model

    assert spec_from_vmconfig(Wrapper(config), tsc_khz=2_000_000) == spec

    with pytest.raises(SmartVMError, match="kernel_image_path") as info:
        spec_from_vmconfig(_config(boot_source={"boot_args": "x"}))
    assert info.value.code == "INVALID_CONFIG"
    two_roots = _config(
        boot_source={"kernel_image_path": "/k"},
        drives=[
            {"drive_id": "a", "path_on_host": "/a", "is_root_device": True},
            {"drive_id": "b", "path_on_host": "/b", "is_root_device": True},
        ],
    )
    with pytest.raises(SmartVMError, match="only one drive"):
        spec_from_vmconfig(two_roots)
