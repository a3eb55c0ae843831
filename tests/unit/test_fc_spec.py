"""The vendored Firecracker spec must stay identical to the shared one the issue names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fc_spec import SPEC_PATH, SpecViolation, load_spec, validate_request

SHARED_SPEC = Path(__file__).resolve().parents[2].parent / "shared/specs/firecracker-api.yaml"


@pytest.mark.skipif(not SHARED_SPEC.exists(), reason=f"{SHARED_SPEC} is not present in this checkout")
def test_vendored_spec_equals_shared_spec_byte_for_byte() -> None:
    assert SPEC_PATH.read_bytes() == SHARED_SPEC.read_bytes()


def test_vendored_spec_is_firecracker_1_16_1() -> None:
    assert load_spec()["info"]["version"] == "1.16.1"


def test_spec_loader_keeps_off_as_a_string() -> None:
    # Plain YAML 1.1 would turn the logger level ``Off`` into False.
    levels = load_spec()["definitions"]["Logger"]["properties"]["level"]["enum"]
    assert levels == ["Error", "Warning", "Info", "Debug", "Trace", "Off"]


def test_validator_rejects_unknown_fields_and_accepts_known_ones() -> None:
    validate_request("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    with pytest.raises(SpecViolation, match="Additional properties"):
        validate_request("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock", "bogus": 1})
