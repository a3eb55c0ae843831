"""The builder VM that turns a package disk into an L2 layer.

A short-lived QEMU guest boots the language's kernel with its root on a fresh qcow2 overlay of the
base rootfs (``<tmp>/layer.qcow2``) and the package disk (:mod:`exec_sandbox.packages.disk`) as a
second, read-only drive. The kernel argument ``sbx.layer`` makes the guest's init copy the disk's
tree into the root filesystem, sync and power off instead of starting the agent (see
``guest/init``); no network device exists and the package disk is the only input. The overlay,
now holding the installed packages, is the layer; the host checks QEMU's exit and the init's
``sbx-layer: installed`` console line before it is published. QEMU is always stopped (and its
runtime files removed) before this returns, also on failure or cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from exec_sandbox.errors import SandboxTransientError
from exec_sandbox.packages.layers import LAYER_FILE
from exec_sandbox.settings import Settings
from exec_sandbox.storage.qcow2 import create_overlay_with_qemu_img, get_image_info
from exec_sandbox.vm.spec import COLD_BOOT_TB_SIZE_MIB
from exec_sandbox.vm_manager import ImageBundle
from smartvm.cleanup import shielded
from smartvm.errors import SmartVMError
from smartvm.leftovers import private_runtime_dir
from smartvm.qemu import DriveSpec, QemuMachine, QemuMachineSpec

__all__ = ["LAYER_KERNEL_ARG", "build_layer", "builder_spec"]

logger = logging.getLogger(__name__)

LAYER_KERNEL_ARG = "sbx.layer"
_DONE_LINE = "sbx-layer: installed"
_BUILDER_MEMORY_MB = 256
_HEADROOM = 64 << 20  # free space the layer's filesystem keeps beyond the packages


def builder_spec(bundle: ImageBundle, layer: Path, disk: Path, name: str) -> QemuMachineSpec:
    """The builder machine: root on ``layer``, the package disk read-only, no NIC. Pure."""
    return QemuMachineSpec(
        name=name,
        kernel=bundle.kernel,
        initrd=bundle.initrd,
        cmdline=f"{bundle.boot_args} {LAYER_KERNEL_ARG}",
        vcpus=1,
        memory_mib=_BUILDER_MEMORY_MB,
        acpi=bundle.needs_acpi,
        drives=(
            DriveSpec(id="root", path=layer, format="qcow2", cache="writeback"),
            DriveSpec(id="packages", path=disk, format="raw", read_only=True),
        ),
        rng=True,
        tb_size_mib=COLD_BOOT_TB_SIZE_MIB,
    )


async def build_layer(
    bundle: ImageBundle,
    disk: Path,
    tmp: Path,
    *,
    settings: Settings,
    runtime_dir: Path | None = None,
    timeout_s: float = 600.0,
) -> Path:
    """Make ``tmp/layer.qcow2``: the base rootfs of ``bundle`` with ``disk``'s tree copied in."""
    layer = tmp / LAYER_FILE  # tmp and disk are absolute (made by the layer cache)
    base = bundle.rootfs.absolute()
    info = await get_image_info(base, qemu_img=settings.qemu_img_binary)
    # Room for the packages: the guest grows its filesystem to the overlay's virtual size first.
    disk_bytes = (await asyncio.to_thread(disk.stat)).st_size
    size = info.virtual_size + 2 * disk_bytes + _HEADROOM
    await create_overlay_with_qemu_img(base, layer, qemu_img=settings.qemu_img_binary, size=size)
    vm_id = f"layer-{tmp.name[-8:]}".replace("_", "-")
    machine = QemuMachine(
        builder_spec(bundle, layer, disk, f"sbx-{vm_id}"),
        vm_id=vm_id,
        binary=settings.qemu_system_binary,
        runtime_dir=runtime_dir or private_runtime_dir(),
        accel="tcg" if settings.force_emulation else None,
    )
    try:
        await machine.start()
        async with asyncio.timeout(timeout_s):
            code = await machine.wait()
    except (SmartVMError, TimeoutError) as exc:
        raise SandboxTransientError(
            f"the package layer builder VM failed: {exc}",
            context={"field": "packages", "console_tail": machine.console_output()[-4000:],
                     "qemu_stderr": machine.stderr_tail()[-2000:]},
        ) from exc
    finally:
        await shielded(machine.stop(timeout=3.0))  # a second cancellation cannot leave QEMU behind
    console = machine.console_output()
    if _DONE_LINE not in console:
        raise SandboxTransientError(
            f"the package layer builder VM ended (exit code {code}) without installing the packages",
            context={"field": "packages", "console_tail": console[-4000:], "exit_code": code},
        )
    logger.info("package layer built for %s (%d KiB package disk)", bundle.language, disk_bytes >> 10)
    return layer
