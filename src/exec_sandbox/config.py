"""``SchedulerConfig``: the frozen, validated knobs of a :class:`~exec_sandbox.Scheduler`.

Per-call arguments of ``Scheduler.run`` (timeout, memory, env, network) fall back to these defaults.
Where images live and which QEMU tools run stay in :class:`~exec_sandbox.settings.Settings`
(``EXEC_SANDBOX_*``); ``images_dir`` / ``cache_dir`` here override it when set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.models import PortForward
from exec_sandbox.protocol.agent import DEFAULT_OUTPUT_CAP_BYTES, MAX_CODE_BYTES
from exec_sandbox.settings import Settings
from exec_sandbox.validation import MIN_MEMORY_MB, validate_domains, validate_port_forwards

__all__ = [
    "DEFAULT_MEMORY_OVERCOMMIT_RATIO",
    "DEFAULT_VM_OVERHEAD_MB",
    "DEFAULT_VM_START_FOOTPRINT_MB",
    "ENV_PREFIX",
    "MAX_MEMORY_MB",
    "MAX_TIMEOUT_SECONDS",
    "SchedulerConfig",
]

MAX_MEMORY_MB: Final = 16384
MAX_TIMEOUT_SECONDS: Final = 3600.0
# Host RAM a TCG guest costs beyond its own RAM: ~48 MiB translation cache (tb-size=32) plus QEMU
# itself and the mapped kernel, measured at ~60 MiB here (see shared/notes/qemu-field-notes.md).
DEFAULT_VM_OVERHEAD_MB: Final = 60
# Host RAM the live admission guard counts for a VM that is still starting (its pages are not in
# MemAvailable yet). Measured here: a snapshot restore settles at ~30-45 MiB RSS, a cold boot of a
# Python guest at ~100-120 MiB; the larger one, rounded up.
DEFAULT_VM_START_FOOTPRINT_MB: Final = 128
# Committed guest RAM may be this many times the usable host RAM. An idle restored VM really holds
# ~25-35 MiB of its 316 MiB charge (256 MiB guest + 60 MiB overhead), so 4x still leaves the live
# guard (real MemAvailable, see exec_sandbox.sandbox.admission) as the check that binds; 4x admits ~290
# such VMs on a 24 GiB host. Use 1.0 for a budget that never over-commits.
DEFAULT_MEMORY_OVERCOMMIT_RATIO: Final = 4.0
ENV_PREFIX: Final = "EXEC_SANDBOX_SCHEDULER_"
_MIB: Final = 1024 * 1024


class SchedulerConfig(BaseModel):
    """Validated, immutable Scheduler configuration. Unknown fields are an error (catches typos)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # Per-run defaults
    default_memory_mb: int = Field(default=256, ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB)
    default_vcpus: int = Field(default=1, ge=1, le=64)
    default_timeout_seconds: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_SECONDS)
    max_timeout_seconds: float = Field(
        default=MAX_TIMEOUT_SECONDS, gt=0, le=86400, description="largest timeout a caller may ask for"
    )
    session_idle_timeout_seconds: float = Field(default=300.0, gt=0, le=86400)

    # Where things live (None: Settings / EXEC_SANDBOX_* decide)
    images_dir: Path | None = None
    cache_dir: Path | None = None

    # Capacity
    warm_pool_size: int = Field(default=0, ge=0, le=256, description="ready VMs kept per language")
    warm_pool_refill_concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "VMs a warm pool makes at once (per language). 1 keeps refills from competing with "
            "foreground runs for the CPU on small hosts; raise it for sustained throughput"
        ),
    )
    # Admission (see exec_sandbox.sandbox.admission for the model and why it is shaped so)
    memory_overcommit_ratio: float = Field(
        default=DEFAULT_MEMORY_OVERCOMMIT_RATIO,
        gt=0,
        le=16.0,
        description="committed guest RAM + overhead may be this many times the usable host RAM",
    )
    cpu_overcommit_ratio: float = Field(
        default=4.0,
        gt=0,
        le=64.0,
        description="vCPUs of busy VMs (starting, or in a one-shot run) per usable host CPU; "
        "idle sessions do not count",
    )
    max_concurrent_vms: int | None = Field(
        default=None, ge=1, description="explicit cap on top of the budget"
    )
    admission_timeout_seconds: float = Field(default=60.0, ge=0, le=86400)
    host_memory_reserve_mb: int = Field(
        default=1024,
        ge=0,
        description="host RAM never handed to VMs: left out of the budget, and the live guard "
        "keeps at least this much really free",
    )
    vm_overhead_mb: int = Field(
        default=DEFAULT_VM_OVERHEAD_MB,
        ge=0,
        le=4096,
        description="host RAM per VM beyond its guest RAM (QEMU, TCG cache)",
    )
    admission_live_memory_guard: bool = Field(
        default=True,
        description="refuse (queue) a VM start that would take the host's real free memory "
        "(MemAvailable and cgroup headroom, read at each decision) below host_memory_reserve_mb",
    )
    vm_start_footprint_mb: int = Field(
        default=DEFAULT_VM_START_FOOTPRINT_MB,
        ge=0,
        le=MAX_MEMORY_MB,
        description="host RAM the live guard assumes a starting VM takes until it is up "
        "(capped at its guest RAM + overhead)",
    )

    # Network (off unless asked for). Every networked sandbox gets its own egress gateway
    # (exec_sandbox.egress): ``allowed_domains``/``allowed_cidrs`` are all it can reach, through the
    # gateway's proxy and DNS. The egress fields are checked as one EgressPolicy when the Scheduler
    # starts (and per call), raising SandboxInputError naming the field.
    network_enabled: bool = Field(
        default=False, description="a NIC even without an allowlist (then it carries port forwards only)"
    )
    allowed_domains: tuple[str, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()
    port_forwards: tuple[PortForward, ...] = ()
    # name -> exec_sandbox.Secret (or a mapping with value/hosts): the guest sees a placeholder only
    secrets: dict[str, Any] = Field(default_factory=dict)
    host_overrides: dict[str, str | tuple[str, ...]] = Field(
        default_factory=dict, description="hosts-file-like entries for the egress resolver"
    )
    egress_allow_private: bool = Field(
        default=False, description="let allowlisted names resolve to loopback/private/link-local ranges"
    )
    egress_limits: dict[str, int | None] = Field(
        default_factory=dict, description="EgressLimits fields: max_connections, max_bytes_in, ..."
    )
    egress_dns_server: str | None = Field(
        default=None, description="upstream DNS server (IP or IP:port) for allowlisted names; None: host's"
    )
    egress_ca_file: Path | None = Field(
        default=None, description="extra CA certificates (PEM) trusted for upstream servers, host and guest"
    )

    # Size limits
    max_output_bytes: int = Field(
        default=DEFAULT_OUTPUT_CAP_BYTES,
        ge=0,
        le=1024 * _MIB,
        description="cap per stream (stdout, stderr) of one run",
    )
    max_code_bytes: int = Field(default=_MIB, ge=1, le=MAX_CODE_BYTES)
    max_file_bytes: int = Field(default=256 * _MIB, ge=1, le=64 * 1024 * _MIB)
    # Size of each guest's disk (its work dir lives there), MiB; None: the image's own, which has
    # room for max_file_bytes' default plus headroom. Larger: a sparse qcow2 overlay of that virtual
    # size, the guest grows its filesystem at boot (once; snapshots are keyed by the size).
    disk_size_mb: int | None = Field(default=None, ge=256, le=1024 * 1024)

    # Speed
    enable_memory_snapshots: bool = True

    @field_validator("allowed_domains", mode="before")
    @classmethod
    def _domains(cls, v: Any) -> tuple[str, ...]:
        # SandboxInputError is a ValueError, so pydantic reports it as a normal validation error.
        return validate_domains(v)

    @field_validator("secrets", mode="before")
    @classmethod
    def _mask_secrets(cls, v: Any) -> Any:
        # A plain {"value": ..., "hosts": [...]} keeps its value as a SecretStr, so no repr or log of
        # the config shows it (the full check is EgressPolicy's, when the Scheduler starts).
        if isinstance(v, Mapping):
            return {
                name: {**item, "value": SecretStr(item["value"])}
                if isinstance(item, Mapping) and isinstance(item.get("value"), str)
                else item
                for name, item in v.items()
            }
        return v

    @field_validator("port_forwards", mode="before")
    @classmethod
    def _forwards(cls, v: Any) -> tuple[PortForward, ...]:
        return validate_port_forwards(v)

    @model_validator(mode="after")
    def _consistent(self) -> SchedulerConfig:
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError(
                f"default_timeout_seconds ({self.default_timeout_seconds:g}) is larger than "
                f"max_timeout_seconds ({self.max_timeout_seconds:g})"
            )
        return self

    def __hash__(self) -> int:
        # Frozen, so hashable - with mapping fields, by a canonical dump (secret values masked).
        return hash(self.model_dump_json(exclude={"secrets"}) + repr(sorted(self.secrets)))

    def settings(self) -> Settings:
        """``Settings`` (from ``EXEC_SANDBOX_*``) with this config's ``images_dir``/``cache_dir`` applied."""
        overrides: dict[str, Any] = {}
        if self.cache_dir is not None:
            overrides["cache_dir"] = self.cache_dir
        if self.images_dir is not None:
            overrides["images_dir"] = self.images_dir
        return Settings(**overrides)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, prefix: str = ENV_PREFIX, **overrides: Any
    ) -> SchedulerConfig:
        """Build from ``EXEC_SANDBOX_SCHEDULER_<FIELD>`` variables; keyword ``overrides`` win.

        ``allowed_domains`` is comma-separated; ``port_forwards`` is comma-separated CLI forms
        (``8080:80,53/udp``) or a JSON list of objects. Unknown ``EXEC_SANDBOX_SCHEDULER_*`` variables
        are an error, like unknown fields. Raises :class:`SandboxInputError` naming the variable.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        fields = cls.model_fields
        for var, raw in env.items():
            if not var.startswith(prefix):
                continue
            name = var[len(prefix) :].lower()
            if name not in fields:
                raise SandboxInputError(
                    f"{var}: unknown setting; known: {', '.join(prefix + f.upper() for f in fields)}",
                    context={"field": var, "value": raw[:200]},
                )
            data[name] = _parse_env_value(name, var, raw)
        data.update(overrides)
        try:
            return cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else ""
            field = prefix + name.upper() if name in data and name not in overrides else name or "config"
            raise SandboxInputError(
                f"{field}: {first['msg']}",
                context={
                    "field": field,
                    "value": repr(first.get("input"))[:200],
                    "errors": exc.errors(include_url=False, include_context=False),
                },
            ) from None


def _parse_env_value(name: str, var: str, raw: str) -> Any:
    if raw.strip() == "" and name in ("images_dir", "cache_dir", "max_concurrent_vms"):
        return None
    if name in ("secrets", "host_overrides", "egress_limits"):  # JSON objects
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SandboxInputError(
                f"{var}: invalid JSON ({exc.msg})", context={"field": var}
            ) from None
    if name in ("allowed_domains", "allowed_cidrs"):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if name == "port_forwards":
        text = raw.strip()
        if text.startswith("[{") or text == "[]":
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise SandboxInputError(
                    f"{var}: invalid JSON ({exc.msg})", context={"field": var, "value": raw[:200]}
                ) from None
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return raw  # pydantic's lax mode turns "512" / "true" / "1.5" into the field's type
