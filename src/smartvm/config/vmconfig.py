"""VMConfig: an owned, typed copy of a microVM config that validates itself and builds API payloads.

Construction vs. validation
---------------------------
``VMConfig(data)`` raises ``SmartVMError(code="INVALID_CONFIG")`` only when the
input cannot be represented by the typed model at all: it is not a mapping /
:class:`VMConfigModel` / :class:`VMConfig`, a value has the wrong JSON type
(``"2"`` for an integer, a dict where a list belongs), or an enum value is not
one the spec lists. All such problems are reported together, with their paths.

Everything else - missing sections or fields, out-of-range numbers, id rules,
duplicates, cross-section rules, unknown fields - is accepted at construction
and reported by :meth:`VMConfig.validate`, which collects *all* problems.

Payload builders do not validate (they serialise what is there), except that
a missing ``boot_source`` cannot be serialised. Use
:func:`smartvm.config.boot_configuration_steps`, which validates first, to get
bodies that are guaranteed to satisfy the spec.
"""

from __future__ import annotations

import copy
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from smartvm.config.models import (
    Drive,
    NetworkInterface,
    Pmem,
    VMConfigModel,
)
from smartvm.config.payloads import spec_payload
from smartvm.config.validation import unknown_field_errors, validate_model
from smartvm.errors import ErrorCode, SmartVMError

__all__ = ["VMConfig", "ValidationResult", "format_validation_error"]

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :meth:`VMConfig.validate`: ``valid`` is True exactly when ``errors`` is empty."""

    valid: bool
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.valid


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<config>"


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> list[str]:
    """pydantic's errors as ``path: message (got value)`` lines, paths like ``drives[0].drive_id``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "invalid_key":  # the last loc item is the offending key, not an index
            loc = loc[:-1]
        where = _location(loc)
        if prefix:
            where = prefix if where == "<config>" else f"{prefix}.{where}"
        lines.append(f"{where}: {err['msg']} (got {_short_repr(err['input'])})")
    return lines


def _invalid(message: str, errors: list[str]) -> SmartVMError:
    return SmartVMError(ErrorCode.INVALID_CONFIG, message, details={"errors": errors})


def _owned_model(model_type: type[_M], data: object, what: str) -> _M:
    """A fresh, validated ``model_type`` sharing nothing with ``data``."""
    if isinstance(data, model_type):
        raw: object = data.model_dump(by_alias=True)
    elif isinstance(data, Mapping):
        try:
            raw = copy.deepcopy(dict(data))
        except Exception as exc:  # arbitrary objects inside the mapping may refuse to be copied
            raise _invalid(f"{what} cannot be copied: {exc}", [str(exc)]) from exc
    else:
        raise _invalid(
            f"{what} must be a mapping or a {model_type.__name__}, not {type(data).__name__}",
            [f"{what}: expected a mapping, got {type(data).__name__}"],
        )
    try:
        return model_type.model_validate(raw)
    except ValidationError as exc:
        errors = format_validation_error(exc, prefix="" if what == "config" else what)
        raise _invalid(f"invalid {what}: " + "; ".join(errors), errors) from exc


class VMConfig:
    """A validated-on-demand microVM config that speaks Firecracker's API.

    ``VMConfig(data)`` accepts a mapping (e.g. parsed JSON/TOML), a
    :class:`VMConfigModel` or another :class:`VMConfig`, and deep-copies it:
    later changes to ``data`` never reach this object.
    """

    __slots__ = ("_config",)

    def __init__(self, data: Mapping[str, Any] | VMConfigModel | VMConfig) -> None:
        if isinstance(data, VMConfig):
            data = data.config
        self._config: VMConfigModel = _owned_model(VMConfigModel, data, "config")

    def __repr__(self) -> str:
        return f"VMConfig(id={self._config.id!r})"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> VMConfig:
        """Load a config from a ``.json`` or ``.toml`` file (same layout as the mapping form).

        Unreadable, unparsable or unrepresentable files raise ``SmartVMError(INVALID_CONFIG)``
        with the path in ``details``; semantic problems are left to :meth:`validate` as usual.
        """
        file = Path(path)
        details = {"path": str(file)}
        suffix = file.suffix.lower()
        if suffix not in (".json", ".toml"):
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG,
                f"config file {file} must end in .json or .toml",
                details=details,
            )
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG, f"cannot read config file {file}: {exc}", details=details
            ) from exc
        try:
            data: object = json.loads(text) if suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG,
                f"config file {file} is not valid {suffix[1:].upper()}: {exc}",
                details=details,
            ) from exc
        try:
            return cls(data)  # type: ignore[arg-type]  # non-mappings are refused by __init__
        except SmartVMError as exc:
            exc.details.setdefault("path", str(file))
            raise

    @property
    def config(self) -> VMConfigModel:
        """The typed model (owned by this object; edit it only if you mean to change this config)."""
        return self._config

    @property
    def id(self) -> str | None:
        return self._config.id

    # ---------------------------------------------------------------- checks

    def validate(self) -> ValidationResult:
        """Check everything Firecracker would check before boot; collect every problem."""
        errors = validate_model(self._config)
        return ValidationResult(valid=not errors, errors=errors)

    def ensure_valid(self) -> None:
        """Raise ``SmartVMError(INVALID_CONFIG)`` listing every problem, unless the config is valid."""
        result = self.validate()
        if not result.valid:
            raise _invalid("invalid VM config: " + "; ".join(result.errors), result.errors)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the whole config (unset fields omitted; unknown fields kept)."""
        return self._config.model_dump(mode="json", by_alias=True, exclude_none=True)

    # -------------------------------------------------------------- payloads

    def to_boot_source_payload(self) -> dict[str, Any]:
        """Body of ``PUT /boot-source``."""
        if self._config.boot_source is None:
            raise _invalid("boot_source is required", ["boot_source is required"])
        return spec_payload(self._config.boot_source)

    def to_machine_config_payload(self) -> dict[str, Any]:
        """Body of ``PUT /machine-config`` (always present: Firecracker's defaults when not given)."""
        return spec_payload(self._config.machine_config)

    def to_cpu_config_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /cpu-config``, or None when no custom CPU template is configured."""
        return _optional(self._config.cpu_config)

    def to_drive_payload(self, drive: Drive | Mapping[str, Any]) -> dict[str, Any]:
        """Body of ``PUT /drives/{drive_id}`` for a drive of this config or a drive given as a mapping."""
        return spec_payload(_section(Drive, drive, "drive"))

    def to_drive_payloads(self) -> list[dict[str, Any]]:
        return [spec_payload(drive) for drive in self._config.drives]

    def to_pmem_payload(self, pmem: Pmem | Mapping[str, Any]) -> dict[str, Any]:
        """Body of ``PUT /pmem/{id}``."""
        return spec_payload(_section(Pmem, pmem, "pmem"))

    def to_network_interface_payload(self, iface: NetworkInterface | Mapping[str, Any]) -> dict[str, Any]:
        """Body of ``PUT /network-interfaces/{iface_id}``."""
        return spec_payload(_section(NetworkInterface, iface, "network_interface"))

    def to_network_interface_payloads(self) -> list[dict[str, Any]]:
        return [spec_payload(iface) for iface in self._config.network_interfaces]

    def to_vsock_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /vsock``, or None when no vsock device is configured."""
        return _optional(self._config.vsock)

    def to_balloon_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /balloon``, or None when no balloon device is configured."""
        return _optional(self._config.balloon)

    def to_mmds_config_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /mmds/config``, or None when MMDS is not configured."""
        return _optional(self._config.mmds)

    def to_metrics_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /metrics``, or None when metrics are not configured."""
        return _optional(self._config.metrics)

    def to_logger_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /logger``, or None when the logger is not configured."""
        return _optional(self._config.logger)

    def to_entropy_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /entropy``, or None when no entropy device is configured."""
        return _optional(self._config.entropy)

    def to_serial_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /serial``, or None when the serial device is not configured."""
        return _optional(self._config.serial)

    def to_memory_hotplug_payload(self) -> dict[str, Any] | None:
        """Body of ``PUT /hotplug/memory``, or None when no virtio-mem device is configured."""
        return _optional(self._config.memory_hotplug)


def _optional(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else spec_payload(model)


def _section(model_type: type[_M], value: _M | Mapping[str, Any], what: str) -> _M:
    if isinstance(value, model_type):
        return value
    # A mapping never passed through validate(), so reject unknown fields here
    # rather than silently dropping what is probably a typo.
    model = _owned_model(model_type, value, what)
    errors = unknown_field_errors(model, what)
    if errors:
        raise _invalid(f"invalid {what}: " + "; ".join(errors), errors)
    return model
