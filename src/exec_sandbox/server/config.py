"""``ServeConfig``: the validated settings of ``sbx serve`` (API keys are kept only as sha256 digests).

Keys come from ``--api-key`` (repeatable), ``$SBX_API_KEYS`` (comma separated) and a TOML config file
(``api_keys = [...]`` or ``api_key_sha256 = [...]`` for keys already hashed). A key never touches the
disk or the logs in clear; :func:`hash_api_key` is the one place it is digested.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxInputError

__all__ = ["API_KEYS_ENV", "DEFAULT_HOST", "DEFAULT_PORT", "ServeConfig", "hash_api_key", "load_serve_config"]

API_KEYS_ENV: Final = "SBX_API_KEYS"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 3000
_MIB: Final = 1024 * 1024


def hash_api_key(key: str) -> str:
    """The sha256 hex digest a key is stored and compared as."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ServeConfig(BaseModel):
    """Settings of one ``sbx serve`` process. Unknown fields are an error (catches typos)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    api_key_hashes: frozenset[str] = Field(default_factory=frozenset, description="sha256 hex digests")
    max_sandboxes_per_key: int = Field(default=20, ge=1, description="concurrent sandboxes per API key")
    default_sandbox_timeout_seconds: int = Field(default=300, ge=1, description="E2B's default lifetime")
    max_sandbox_timeout_seconds: int = Field(default=86400, ge=1)
    command_timeout_seconds: float = Field(default=3600.0, gt=0, description="cap on one command / cell")
    memory_mb: int = Field(default=256, ge=64, description="guest RAM of each sandbox VM and context VM")
    max_memory_mb_per_key: int | None = Field(
        default=None, ge=64, description="guest RAM a key's sandboxes and contexts may hold at once"
    )
    max_upload_bytes: int = Field(default=100 * _MIB, ge=1)
    max_contexts_per_sandbox: int = Field(default=4, ge=1)
    reap_interval_seconds: float = Field(default=0.5, gt=0)
    state_dir: Path | None = Field(
        default=None, description="paused sandboxes and snapshot templates (default: the user state dir)"
    )
    paused_retention_seconds: int = Field(
        default=7 * 86400, ge=1, description="a paused sandbox is deleted this long after its pause"
    )
    max_saved_per_key: int = Field(
        default=50, ge=1, description="paused sandboxes + snapshot templates a key may keep on disk"
    )
    max_fork_count: int = Field(default=20, ge=1, description="children one fork request may make")
    log_format: Literal["json", "text"] | None = Field(
        default=None, description="log lines as JSON objects or text (default: text on a TTY, else JSON)"
    )
    # Egress of sandboxes created with network.allowOut: the operator's choices, never a client's.
    host_overrides: dict[str, str | tuple[str, ...]] = Field(
        default_factory=dict, description="hosts-file-like entries for the sandboxes' egress resolver"
    )
    egress_allow_private: bool = Field(
        default=False,
        description="let allowlisted names resolve to loopback/private/link-local ranges (any name a client "
        "lists: this host's services become reachable to every key)",
    )

    def scheduler_config(self) -> SchedulerConfig:
        """The Scheduler's config: its defaults plus this server's egress settings."""
        return SchedulerConfig(
            host_overrides=self.host_overrides, egress_allow_private=self.egress_allow_private
        )

    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        return Path(platformdirs.user_state_dir("exec-sandbox")) / "serve"

    @field_validator("host_overrides")
    @classmethod
    def _valid_overrides(cls, v: dict[str, str | tuple[str, ...]]) -> dict[str, str | tuple[str, ...]]:
        # Checked at load: the Scheduler only builds an egress policy for the first networked sandbox.
        if v:
            from exec_sandbox.egress import EgressPolicy

            EgressPolicy(host_overrides=dict(v))
        return v

    @field_validator("api_key_hashes")
    @classmethod
    def _hex_digests(cls, v: frozenset[str]) -> frozenset[str]:
        for h in v:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("api_key_hashes must be lower-case sha256 hex digests")
        return v

    def key_hash_for(self, presented: str | None) -> str | None:
        """The stored digest matching ``presented`` (constant-time compare), or None."""
        if not presented:
            return None
        digest = hash_api_key(presented)
        found = None
        for h in self.api_key_hashes:
            if hmac.compare_digest(h, digest):
                found = h
        return found


def load_serve_config(
    *,
    api_keys: Iterable[str] = (),
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> ServeConfig:
    """Merge keys from the arguments, ``$SBX_API_KEYS`` and ``config_file`` into a :class:`ServeConfig`.

    Settings in the file (any ``ServeConfig`` field, plus ``api_keys``) come first; explicit
    ``overrides`` that are not None win over it.
    """
    env = os.environ if environ is None else environ
    file_data: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SandboxInputError(
                f"cannot read the serve config file {str(config_file)!r}: {exc}",
                context={"field": "config_file", "value": str(config_file)},
            ) from None
    keys = [*api_keys, *(k for k in env.get(API_KEYS_ENV, "").split(",") if k.strip())]
    keys += list(file_data.pop("api_keys", []))
    hashes = {hash_api_key(k.strip()) for k in keys if k.strip()}
    hashes |= {str(h).lower() for h in file_data.pop("api_key_sha256", [])}
    data = {**file_data, **{k: v for k, v in overrides.items() if v is not None}}
    data["api_key_hashes"] = frozenset(hashes)
    try:
        return ServeConfig(**data)
    except ValueError as exc:
        raise SandboxInputError(f"invalid serve configuration: {exc}", context={"field": "serve"}) from None
