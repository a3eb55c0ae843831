"""VMConfig construction: what it refuses outright (unrepresentable input) and how it owns its data."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError

from smartvm.config import Drive, VMConfig, VMConfigModel
from smartvm.errors import SmartVMError
from tests.unit.test_config_samples import full_config, minimal_config


@pytest.mark.parametrize(
    ("value", "type_name"), [(None, "NoneType"), ([], "list"), ("boot", "str"), (42, "int"), (b"{}", "bytes")]
)
def test_non_mapping_input_is_refused(value: Any, type_name: str) -> None:
    with pytest.raises(SmartVMError) as info:
        VMConfig(value)
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.message == f"config must be a mapping or a VMConfigModel, not {type_name}"


# (case id, sections over a minimal config, the one error expected, in "path: problem (got value)" form)
UNREPRESENTABLE: list[tuple[str, dict[str, Any], str]] = [
    ("string for integer", {"machine_config": {"vcpu_count": "2"}}, "machine_config.vcpu_count: "),
    ("float for integer", {"machine_config": {"mem_size_mib": 128.0}}, "machine_config.mem_size_mib: "),
    ("bool for integer", {"vsock": {"guest_cid": True, "uds_path": "/v"}}, "vsock.guest_cid: "),
    ("int for bool", {"machine_config": {"smt": 1}}, "machine_config.smt: "),
    ("string for bool", {"balloon": {"amount_mib": 1, "deflate_on_oom": "yes"}}, "balloon.deflate_on_oom: "),
    ("int for string", {"boot_source": {"kernel_image_path": 7}}, "boot_source.kernel_image_path: "),
    ("section not an object", {"boot_source": "/vmlinux"}, "boot_source: "),
    ("list not a list", {"drives": {"drive_id": "root"}}, "drives: "),
    ("list item not an object", {"network_interfaces": ["eth0"]}, "network_interfaces[0]: "),
    (
        "cache_type in wrong case",
        {"drives": [{"drive_id": "r", "cache_type": "unsafe"}]},
        "drives[0].cache_type: ",
    ),
    ("unknown io engine", {"drives": [{"drive_id": "r", "io_engine": "Uring"}]}, "drives[0].io_engine: "),
    ("unknown mmds version", {"mmds": {"version": "V3", "network_interfaces": []}}, "mmds.version: "),
    ("unknown cpu template", {"machine_config": {"cpu_template": "T3"}}, "machine_config.cpu_template: "),
    ("unknown huge pages", {"machine_config": {"huge_pages": "1G"}}, "machine_config.huge_pages: "),
    ("unknown log level", {"logger": {"level": "Verbose"}}, "logger.level: "),
    ("id not a string", {"id": 5}, "id: "),
    (
        "non-string key",
        {"boot_source": {"kernel_image_path": "/k", 3: 4}},
        "boot_source: Keys should be strings",
    ),
    ("mmds interface not a string", {"mmds": {"network_interfaces": [0]}}, "mmds.network_interfaces[0]: "),
    (
        "nested bucket value",
        {"serial": {"rate_limiter": {"size": "1", "refill_time": 1}}},
        "serial.rate_limiter.size: ",
    ),
]


@pytest.mark.parametrize(
    ("sections", "prefix"), [c[1:] for c in UNREPRESENTABLE], ids=[c[0] for c in UNREPRESENTABLE]
)
def test_unrepresentable_values_are_refused_naming_the_field(sections: dict[str, Any], prefix: str) -> None:
    with pytest.raises(SmartVMError) as info:
        VMConfig({**minimal_config(), **sections})
    assert info.value.code == "INVALID_CONFIG"
    errors = info.value.details["errors"]
    assert len(errors) == 1
    assert errors[0].startswith(prefix)
    assert errors[0] in info.value.message


def test_every_unrepresentable_value_is_reported_together() -> None:
    with pytest.raises(SmartVMError) as info:
        VMConfig({"machine_config": {"vcpu_count": "2", "smt": 1}, "drives": {}, "mmds": {"version": "V3"}})
    assert info.value.details["errors"] == [
        "machine_config.vcpu_count: Input should be a valid integer (got '2')",
        "machine_config.smt: Input should be a valid boolean (got 1)",
        "drives: Input should be a valid list (got {})",
        "mmds.version: Input should be 'V1' or 'V2' (got 'V3')",
    ]


def test_uncopyable_input_is_refused() -> None:
    with pytest.raises(SmartVMError) as info:
        VMConfig({"boot_source": {"kernel_image_path": "/k"}, "extra": (i for i in range(3))})
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.message.startswith("config cannot be copied: ")


def test_semantically_invalid_configs_are_constructed_for_validate_to_judge() -> None:
    vm_config = VMConfig({"machine_config": {"vcpu_count": 0, "mem_size_mib": -5}, "vsock": {}, "bogus": 1})
    assert vm_config.config.machine_config.vcpu_count == 0
    assert vm_config.config.boot_source is None
    assert vm_config.validate().valid is False


def test_null_sections_mean_not_configured() -> None:
    data = {
        **minimal_config(),
        "machine_config": None,
        "drives": None,
        "pmem": None,
        "network_interfaces": None,
    }
    data.update(vsock=None, balloon=None, mmds=None, logger=None)
    vm_config = VMConfig(data)
    assert vm_config.validate().valid is True
    assert vm_config.to_machine_config_payload() == {"vcpu_count": 1, "mem_size_mib": 128}
    assert vm_config.config.drives == []
    assert vm_config.to_vsock_payload() is None


# ------------------------------------------------------------------------ ownership


def test_caller_mutations_after_construction_do_not_leak_in() -> None:
    data = full_config()
    vm_config = VMConfig(data)
    data["drives"][0]["rate_limiter"]["bandwidth"]["size"] = 1
    data["mmds"]["network_interfaces"].append("eth9")
    data["machine_config"]["vcpu_count"] = 8
    del data["vsock"]
    assert vm_config.to_dict() == VMConfig(full_config()).to_dict()


def test_model_input_is_copied_not_shared() -> None:
    model = VMConfigModel.model_validate(full_config())
    vm_config = VMConfig(model)
    assert vm_config.config is not model
    model.drives[0].path_on_host = "/elsewhere"
    model.drives.append(Drive(drive_id="late", path_on_host="/late"))
    assert model.mmds is not None and model.mmds.network_interfaces is not None
    model.mmds.network_interfaces.append("eth9")
    assert vm_config.to_dict() == VMConfig(full_config()).to_dict()


def test_vmconfig_input_gives_an_independent_copy() -> None:
    first = VMConfig(full_config())
    second = VMConfig(first)
    second.config.machine_config.vcpu_count = 4
    second.config.drives.pop()
    assert first.config.machine_config.vcpu_count == 2
    assert len(first.config.drives) == 2


def test_any_mapping_is_accepted() -> None:
    vm_config = VMConfig(MappingProxyType(full_config()))
    assert vm_config.to_dict()["drives"] == full_config()["drives"]


def test_model_input_keeps_unknown_fields_for_validate() -> None:
    model = VMConfigModel.model_validate({**minimal_config(), "surprise": True})
    assert VMConfig(model).validate().errors == ["unknown field 'surprise'"]


def test_to_dict_round_trips_and_is_json_ready() -> None:
    vm_config = VMConfig(full_config())
    as_dict = vm_config.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert VMConfig(as_dict).to_dict() == as_dict
    assert {k: as_dict[k] for k in full_config()} == full_config()


def test_id_and_repr() -> None:
    vm_config = VMConfig(full_config())
    assert vm_config.id == "full-vm-1"
    assert repr(vm_config) == "VMConfig(id='full-vm-1')"
    assert VMConfig(minimal_config()).id is None


# ---------------------------------------------------- device payloads from mappings


def test_drive_payload_from_a_mapping_refuses_unknown_fields_at_any_depth() -> None:
    vm_config = VMConfig(minimal_config())
    with pytest.raises(SmartVMError) as info:
        vm_config.to_drive_payload({"drive_id": "d", "path_on_host": "/d", "readonly": True})
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.details["errors"] == ["unknown field 'drive.readonly' (did you mean 'is_read_only'?)"]
    with pytest.raises(SmartVMError) as info:
        vm_config.to_drive_payload(
            {"drive_id": "d", "rate_limiter": {"bandwith": {"size": 1, "refill_time": 1}}}
        )
    assert info.value.details["errors"] == [
        "unknown field 'drive.rate_limiter.bandwith' (did you mean 'bandwidth'?)"
    ]


def test_interface_payload_from_a_mapping_refuses_wrong_types() -> None:
    vm_config = VMConfig(minimal_config())
    with pytest.raises(SmartVMError) as info:
        vm_config.to_network_interface_payload({"iface_id": "eth0", "host_dev_name": "tap0", "mtu": "1500"})
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.details["errors"] == [
        "network_interface.mtu: Input should be a valid integer (got '1500')"
    ]
    with pytest.raises(SmartVMError) as info:
        vm_config.to_network_interface_payload(["eth0"])  # type: ignore[arg-type]
    assert info.value.message == "network_interface must be a mapping or a NetworkInterface, not list"


def test_payload_from_a_mapping_does_not_keep_the_callers_objects() -> None:
    vm_config = VMConfig(minimal_config())
    limiter = {"ops": {"size": 1, "refill_time": 2}}
    payload = vm_config.to_drive_payload({"drive_id": "d", "path_on_host": "/d", "rate_limiter": limiter})
    limiter["ops"]["size"] = 99
    assert payload["rate_limiter"] == {"ops": {"size": 1, "refill_time": 2}}


# ------------------------------------------------------------------------ from_file


def test_from_json_and_toml_files(tmp_path: Path) -> None:
    json_file = tmp_path / "vm.json"
    json_file.write_text(json.dumps(full_config()))
    toml_file = tmp_path / "vm.toml"
    toml_file.write_text(
        'id = "toml-vm"\n'
        "[boot_source]\n"
        'kernel_image_path = "/vmlinux"\n'
        "[machine_config]\n"
        "vcpu_count = 2\n"
        "mem_size_mib = 256\n"
        "[[drives]]\n"
        'drive_id = "rootfs"\n'
        'path_on_host = "/rootfs.ext4"\n'
        "is_root_device = true\n"
    )
    assert VMConfig.from_file(json_file).to_dict() == VMConfig(full_config()).to_dict()
    from_toml = VMConfig.from_file(str(toml_file))
    assert from_toml.validate().valid is True
    assert from_toml.id == "toml-vm"
    assert from_toml.to_drive_payloads() == [
        {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": True}
    ]


@pytest.mark.parametrize(
    ("name", "content", "message_part"),
    [
        ("vm.yaml", "a: 1", "must end in .json or .toml"),
        ("vm.json", "{not json", "is not valid JSON"),
        ("vm.toml", "= nope", "is not valid TOML"),
        ("vm.json", "[1, 2]", "config must be a mapping or a VMConfigModel, not list"),
        ("vm.json", '{"machine_config": {"vcpu_count": "2"}}', "machine_config.vcpu_count"),
        ("missing.json", None, "cannot read config file"),
    ],
)
def test_bad_config_files_are_clear_errors(
    tmp_path: Path, name: str, content: str | None, message_part: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SmartVMError) as info:
        VMConfig.from_file(path)
    assert info.value.code == "INVALID_CONFIG"
    assert message_part in info.value.message
    assert info.value.details["path"] == str(path)


def test_assignments_to_the_typed_model_are_type_checked() -> None:
    vm_config = VMConfig(full_config())
    iface = vm_config.config.network_interfaces[0]
    iface.host_dev_name = "svnew0eth0"
    assert vm_config.to_network_interface_payload(iface)["host_dev_name"] == "svnew0eth0"
    with pytest.raises(ValidationError):
        iface.host_dev_name = 5  # type: ignore[assignment]
    with pytest.raises(ValidationError):
        vm_config.config.machine_config.vcpu_count = "4"  # type: ignore[assignment]


def test_long_offending_values_are_shortened_in_messages() -> None:
    with pytest.raises(SmartVMError) as info:
        VMConfig({"drives": {"a" * 500: 1}})
    (error,) = info.value.details["errors"]
    assert error.startswith("drives: Input should be a valid list (got {'aaa")
    assert error.endswith("...)")
    assert len(error) < 150
