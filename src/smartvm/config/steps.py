"""The ordered Firecracker API calls that configure a microVM before ``InstanceStart``.

Pure: :func:`boot_configuration_steps` only computes requests; the Firecracker
backend sends them. The order matters to Firecracker:

* logger and metrics first, so later failures are logged (and because they are
  the only resources a snapshot load tolerates, see :func:`observability_steps`);
* ``/cpu-config`` after ``/machine-config``, since a machine-config PUT resets the
  CPU template;
* ``/mmds/config`` after the network interfaces it names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from smartvm.config.vmconfig import VMConfig

__all__ = ["ConfigStep", "boot_configuration_steps", "instance_start_step", "observability_steps"]


@dataclass(frozen=True)
class ConfigStep:
    """One API request: a stable ``name`` for logs/errors, ``method``, URL ``path`` and JSON ``body``.

    Unpacks like the tuple ``(name, method, path, body)``.
    """

    name: str
    method: str
    path: str
    body: dict[str, Any] | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.name, self.method, self.path, self.body))


def _put(name: str, path: str, body: dict[str, Any] | None) -> list[ConfigStep]:
    return [] if body is None else [ConfigStep(name, "PUT", path, body)]


def observability_steps(vm_config: VMConfig) -> list[ConfigStep]:
    """``PUT /logger`` and ``PUT /metrics`` when configured (no validation of the rest)."""
    return [
        *_put("logger", "/logger", vm_config.to_logger_payload()),
        *_put("metrics", "/metrics", vm_config.to_metrics_payload()),
    ]


def boot_configuration_steps(vm_config: VMConfig) -> list[ConfigStep]:
    """Every pre-boot request for ``vm_config``, in an order Firecracker accepts.

    Raises ``SmartVMError(INVALID_CONFIG)`` listing every problem when the
    config does not validate, so each body here satisfies the API spec.
    """
    vm_config.ensure_valid()
    config = vm_config.config
    steps = observability_steps(vm_config)
    steps += _put("machine_config", "/machine-config", vm_config.to_machine_config_payload())
    steps += _put("cpu_config", "/cpu-config", vm_config.to_cpu_config_payload())
    steps += _put("boot_source", "/boot-source", vm_config.to_boot_source_payload())
    for drive in config.drives:
        steps += _put(
            f"drive:{drive.drive_id}", f"/drives/{drive.drive_id}", vm_config.to_drive_payload(drive)
        )
    for pmem in config.pmem:
        steps += _put(f"pmem:{pmem.id}", f"/pmem/{pmem.id}", vm_config.to_pmem_payload(pmem))
    for iface in config.network_interfaces:
        steps += _put(
            f"network_interface:{iface.iface_id}",
            f"/network-interfaces/{iface.iface_id}",
            vm_config.to_network_interface_payload(iface),
        )
    steps += _put("vsock", "/vsock", vm_config.to_vsock_payload())
    steps += _put("balloon", "/balloon", vm_config.to_balloon_payload())
    steps += _put("entropy", "/entropy", vm_config.to_entropy_payload())
    steps += _put("serial", "/serial", vm_config.to_serial_payload())
    steps += _put("memory_hotplug", "/hotplug/memory", vm_config.to_memory_hotplug_payload())
    steps += _put("mmds_config", "/mmds/config", vm_config.to_mmds_config_payload())
    return steps


def instance_start_step() -> ConfigStep:
    """``PUT /actions {"action_type": "InstanceStart"}``: boots the configured microVM."""
    return ConfigStep("instance_start", "PUT", "/actions", {"action_type": "InstanceStart"})
