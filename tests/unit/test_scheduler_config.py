"""SchedulerConfig: defaults, bounds, immutability, network consistency, Settings overrides, from_env."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from exec_sandbox.config import DEFAULT_VM_OVERHEAD_MB, ENV_PREFIX, SchedulerConfig
from exec_sandbox.errors import SandboxInputError
from exec_sandbox.models import PortForward

MiB = 1024 * 1024


def test_defaults() -> None:
    c = SchedulerConfig()
    assert c.default_memory_mb == 256
    assert c.default_vcpus == 1
    assert c.default_timeout_seconds == 30.0
    assert c.session_idle_timeout_seconds == 300.0
    assert c.images_dir is None and c.cache_dir is None
    assert c.warm_pool_size == 0
    assert c.memory_overcommit_ratio == 4.0 and c.cpu_overcommit_ratio == 4.0
    assert c.max_concurrent_vms is None
    assert c.admission_timeout_seconds == 60.0
    assert c.network_enabled is False and c.allowed_domains == () and c.port_forwards == ()
    assert c.max_output_bytes == 10 * MiB
    assert c.max_code_bytes == 1 * MiB
    assert c.max_file_bytes > c.max_code_bytes
    assert c.enable_memory_snapshots is True
    assert c.host_memory_reserve_mb == 1024
    assert c.vm_overhead_mb == DEFAULT_VM_OVERHEAD_MB
    assert c.admission_live_memory_guard is True
    assert c.vm_start_footprint_mb == 128


def test_frozen_and_hashable() -> None:
    c = SchedulerConfig()
    with pytest.raises(ValidationError):
        c.default_memory_mb = 512  # type: ignore[misc]
    assert hash(c) == hash(SchedulerConfig())
    assert c.model_copy(update={"warm_pool_size": 2}).warm_pool_size == 2


def test_unknown_field_is_an_error() -> None:
    with pytest.raises(ValidationError, match="default_memory"):
        SchedulerConfig(default_memory=512)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("default_memory_mb", 63),
        ("default_memory_mb", 16385),
        ("default_memory_mb", "lots"),
        ("default_vcpus", 0),
        ("default_timeout_seconds", 0),
        ("default_timeout_seconds", 3601),
        ("session_idle_timeout_seconds", 0),
        ("warm_pool_size", -1),
        ("memory_overcommit_ratio", 0),
        ("memory_overcommit_ratio", 16.5),
        ("vm_start_footprint_mb", -1),
        ("vm_start_footprint_mb", 16385),
        ("admission_live_memory_guard", "maybe"),
        ("cpu_overcommit_ratio", 0),
        ("cpu_overcommit_ratio", -1),
        ("max_concurrent_vms", 0),
        ("admission_timeout_seconds", -1),
        ("host_memory_reserve_mb", -1),
        ("vm_overhead_mb", -1),
        ("max_output_bytes", -1),
        ("max_code_bytes", 0),
        ("max_code_bytes", 3 * MiB),  # beyond what the agent protocol accepts
        ("max_file_bytes", 0),
    ],
)
def test_bounds(field: str, bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        SchedulerConfig(**{field: bad})
    assert info.value.errors()[0]["loc"] == (field,)


def test_bounds_inclusive() -> None:
    c = SchedulerConfig(
        default_memory_mb=64,
        default_timeout_seconds=3600,
        memory_overcommit_ratio=16.0,
        admission_timeout_seconds=0,
        max_concurrent_vms=1,
        vm_start_footprint_mb=0,
    )
    assert (c.default_memory_mb, c.default_timeout_seconds, c.memory_overcommit_ratio) == (64, 3600.0, 16.0)
    assert c.vm_start_footprint_mb == 0
    assert SchedulerConfig(vm_start_footprint_mb=16384).vm_start_footprint_mb == 16384


def test_default_timeout_cannot_exceed_max() -> None:
    with pytest.raises(ValidationError, match="max_timeout_seconds"):
        SchedulerConfig(default_timeout_seconds=120, max_timeout_seconds=60)
    assert SchedulerConfig(default_timeout_seconds=60, max_timeout_seconds=60).max_timeout_seconds == 60


def test_network_defaults_are_validated_and_normalised() -> None:
    c = SchedulerConfig(
        network_enabled=True,
        allowed_domains=["PyPI.org", "*.pythonhosted.org", "pypi.org."],
        port_forwards=["8080:80", {"guest_port": 53, "protocol": "udp"}],
    )
    assert c.allowed_domains == ("pypi.org", "*.pythonhosted.org")
    assert c.port_forwards == (
        PortForward(guest_port=80, host_port=8080),
        PortForward(guest_port=53, protocol="udp"),
    )
    with pytest.raises(ValidationError, match="IP addresses"):
        SchedulerConfig(network_enabled=True, allowed_domains=["10.0.0.1"])
    with pytest.raises(ValidationError, match="forwarded twice"):
        SchedulerConfig(port_forwards=["80:1", "80:2"])


def test_allowed_domains_imply_the_network() -> None:
    # issue 13: an allowlist is the network (through the egress gateway); no second switch needed
    assert SchedulerConfig(allowed_domains=["example.com"]).allowed_domains == ("example.com",)
    # Port forwards work without outbound network (restricted user-mode net keeps hostfwd).
    assert SchedulerConfig(port_forwards=[8000]).network_enabled is False


def test_settings_override_only_what_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.delenv("EXEC_SANDBOX_IMAGES_DIR", raising=False)
    s = SchedulerConfig().settings()
    assert s.cache_dir == tmp_path / "env-cache"
    assert s.images_dir == tmp_path / "env-cache" / "images"
    s = SchedulerConfig(cache_dir=tmp_path / "c").settings()
    assert (s.cache_dir, s.images_dir) == (tmp_path / "c", tmp_path / "c" / "images")
    s = SchedulerConfig(cache_dir=tmp_path / "c", images_dir=tmp_path / "i").settings()
    assert (s.cache_dir, s.images_dir) == (tmp_path / "c", tmp_path / "i")


def test_from_env() -> None:
    env = {
        ENV_PREFIX + "DEFAULT_MEMORY_MB": "512",
        ENV_PREFIX + "DEFAULT_TIMEOUT_SECONDS": "2.5",
        ENV_PREFIX + "NETWORK_ENABLED": "true",
        ENV_PREFIX + "ALLOWED_DOMAINS": "pypi.org, *.pythonhosted.org",
        ENV_PREFIX + "PORT_FORWARDS": "8080:80,53/udp",
        ENV_PREFIX + "IMAGES_DIR": "/srv/images",
        ENV_PREFIX + "MAX_CONCURRENT_VMS": "",
        "EXEC_SANDBOX_CACHE_DIR": "/ignored/here",  # a Settings variable, not ours
        "UNRELATED": "x",
    }
    c = SchedulerConfig.from_env(env, warm_pool_size=3)
    assert c.default_memory_mb == 512
    assert c.default_timeout_seconds == 2.5
    assert c.network_enabled is True
    assert c.allowed_domains == ("pypi.org", "*.pythonhosted.org")
    assert c.port_forwards == (
        PortForward(guest_port=80, host_port=8080),
        PortForward(guest_port=53, protocol="udp"),
    )
    assert c.images_dir == Path("/srv/images")
    assert c.max_concurrent_vms is None
    assert c.warm_pool_size == 3


def test_from_env_json_port_forwards_and_override_wins() -> None:
    env = {
        ENV_PREFIX + "PORT_FORWARDS": '[{"guest_port": 22, "host_port": 2222}]',
        ENV_PREFIX + "WARM_POOL_SIZE": "1",
    }
    c = SchedulerConfig.from_env(env, warm_pool_size=4)
    assert c.port_forwards == (PortForward(guest_port=22, host_port=2222),)
    assert c.warm_pool_size == 4


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "DEFAULT_MEMORY_MB", "1024")
    assert SchedulerConfig.from_env().default_memory_mb == 1024


@pytest.mark.parametrize(
    ("env", "field", "text"),
    [
        (
            {ENV_PREFIX + "DEFAULT_MEMORY_MB": "5"},
            ENV_PREFIX + "DEFAULT_MEMORY_MB",
            "greater than or equal to 64",
        ),
        ({ENV_PREFIX + "NETWORK_ENABLED": "perhaps"}, ENV_PREFIX + "NETWORK_ENABLED", "boolean"),
        ({ENV_PREFIX + "DEFAULT_MEMRY_MB": "512"}, ENV_PREFIX + "DEFAULT_MEMRY_MB", "unknown setting"),
        ({ENV_PREFIX + "PORT_FORWARDS": "[{oops"}, ENV_PREFIX + "PORT_FORWARDS", "invalid JSON"),
    ],
)
def test_from_env_errors_name_the_variable(env: dict[str, str], field: str, text: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        SchedulerConfig.from_env(env)
    assert info.value.context["field"] == field
    assert text in info.value.message
    assert info.value.message.startswith(field)


def test_from_env_error_in_override_names_the_field() -> None:
    with pytest.raises(SandboxInputError) as info:
        SchedulerConfig.from_env({}, warm_pool_size=-1)
    assert info.value.context["field"] == "warm_pool_size"
