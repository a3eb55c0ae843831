"""Pure tests of exec_sandbox.egress.policy (no sockets, no processes)."""

from __future__ import annotations

import ipaddress

import pytest

from exec_sandbox.egress.policy import (
    EgressLimits,
    EgressPolicy,
    Secret,
    SecretPlaceholders,
    forbidden_reason,
    is_forbidden_address,
    normalize_hostname,
)
from exec_sandbox.errors import SandboxInputError


def _field(**kwargs: object) -> str:
    with pytest.raises(SandboxInputError) as info:
        EgressPolicy(**kwargs)  # type: ignore[arg-type]
    return str(info.value.context["field"])


def test_names_are_normalised_and_deduplicated() -> None:
    p = EgressPolicy(allowed_domains=["API.Example.COM.", "api.example.com", "*.Bücher.de"])
    assert p.allowed_domains == ["*.xn--bcher-kva.de", "api.example.com"]
    assert normalize_hostname("Bücher.DE") == "xn--bcher-kva.de"


def test_exact_and_wildcard_matching() -> None:
    p = EgressPolicy(allowed_domains=["api.example.com", "*.example.org", "*.bücher.de"])
    assert p.is_allowed("api.example.com")
    assert p.is_allowed("API.example.com.")
    assert not p.is_allowed("x.api.example.com")
    assert not p.is_allowed("example.com")
    assert p.is_allowed("a.example.org") and p.is_allowed("a.b.example.org")
    assert not p.is_allowed("example.org")  # the wildcard is strictly below
    assert not p.is_allowed("evilexample.org")
    assert p.is_allowed("shop.bücher.de") and p.is_allowed("shop.xn--bcher-kva.de")
    assert not p.is_allowed("127.0.0.1") and not p.is_allowed("not a name") and not p.is_allowed("")


@pytest.mark.parametrize("bad", ["1.2.3.4", "::1", "[::1]", "a..b", "-bad.com", "bad-.com", "a b.com",
                                 "x" * 64 + ".com", "*", "a.*.com", "foo.123", "under_score\x00.com"])
def test_bad_domains_name_the_field(bad: str) -> None:
    assert _field(allowed_domains=[bad]) == "allowed_domains"


def test_ip_literal_error_points_to_allowed_cidrs() -> None:
    with pytest.raises(SandboxInputError, match="allowed_cidrs"):
        EgressPolicy(allowed_domains=["10.0.0.1"])


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_port_out_of_range(port: int) -> None:
    assert _field(allowed_ports=[port]) == "allowed_ports"


def test_secret_without_hosts() -> None:
    assert _field(allowed_domains=["a.com"], secrets={"K": {"value": "v", "hosts": []}}) == "secrets.K.hosts"


def test_secret_host_not_allowlisted() -> None:
    assert _field(allowed_domains=["a.com"],
                  secrets={"K": Secret(value="v", hosts=["b.com"])}) == "secrets.K.hosts"  # type: ignore[arg-type]
    # a wildcard secret host must be covered by the allowlist too
    assert _field(allowed_domains=["a.com"],
                  secrets={"K": {"value": "v", "hosts": ["*.a.com"]}}) == "secrets.K.hosts"
    EgressPolicy(allowed_domains=["*.a.com"], secrets={"K": {"value": "v", "hosts": ["x.a.com"]}})


def test_other_bad_fields() -> None:
    bad_name = {"1BAD": {"value": "v", "hosts": ["a.com"]}}
    assert _field(allowed_domains=["a.com"], secrets=bad_name) == "secrets"
    assert _field(allowed_domains=["a.com"],
                  secrets={"K": {"value": "a\r\nX-Evil: 1", "hosts": ["a.com"]}}) == "secrets.K.value"
    assert _field(allowed_cidrs=["10.0.0.0/33"]) == "allowed_cidrs"
    assert _field(host_overrides={"a.com": "not-an-ip"}) == "host_overrides"
    assert _field(host_overrides={"1.2.3.4": "127.0.0.1"}) == "host_overrides"
    assert _field(limits={"max_connections": 0}) == "limits.max_connections"
    assert _field(unknown=1) == "unknown"


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
                                "169.254.169.254", "169.254.1.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
                                "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1",
                                "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "240.0.0.1"])
def test_forbidden_addresses(ip: str) -> None:
    assert is_forbidden_address(ip), ip
    assert forbidden_reason(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(ip: str) -> None:
    assert not is_forbidden_address(ip)


def test_metadata_is_named() -> None:
    assert forbidden_reason("169.254.169.254") == "cloud metadata address"


def test_address_refusal_honours_allow_private() -> None:
    strict = EgressPolicy(allowed_domains=["a.com"])
    loose = EgressPolicy(allowed_domains=["a.com"], allow_private=True)
    assert "allow_private" in (strict.address_refusal("127.0.0.1") or "")
    assert loose.address_refusal("127.0.0.1") is None
    assert strict.address_refusal("8.8.8.8") is None


def test_ip_literals_need_allowed_cidrs() -> None:
    p = EgressPolicy(allowed_cidrs=["8.8.8.0/24", "10.0.0.0/8"])
    assert p.ip_literal_refusal("8.8.8.7") is None
    assert "allowed_cidrs" in (p.ip_literal_refusal("1.1.1.1") or "")
    assert "allow_private" in (p.ip_literal_refusal("10.0.0.1") or "")  # still private
    assert EgressPolicy().ip_literal_refusal("8.8.8.8")


def test_ports() -> None:
    assert EgressPolicy().port_refusal(8080) is None
    p = EgressPolicy(allowed_ports=[443, 80, 443])
    assert p.allowed_ports == [80, 443]
    assert p.port_refusal(443) is None and p.port_refusal(22)


def test_overrides_normalised() -> None:
    p = EgressPolicy(host_overrides={"API.test.": "127.0.0.1", "b.test": ["::1", "127.0.0.1"]})
    assert p.host_overrides["api.test"] == [ipaddress.ip_address("127.0.0.1")]
    assert len(p.host_overrides["b.test"]) == 2


def test_enabled_and_limits_defaults() -> None:
    assert not EgressPolicy().enabled
    assert EgressPolicy(allowed_domains=["a.com"]).enabled
    assert EgressLimits().max_connections == 64


def test_placeholders_hide_values() -> None:
    p = EgressPolicy(allowed_domains=["api.test", "*.svc.test", "other.test"],
                     secrets={"TOKEN": {"value": "real-value-123", "hosts": ["api.test", "*.svc.test"]}})
    ph = SecretPlaceholders(p)
    env = ph.guest_env()
    assert env["TOKEN"].startswith("sbx-secret-") and len(env["TOKEN"]) > 30
    assert "real-value-123" not in repr(ph) + repr(p) + str(p.model_dump()) + repr(env)
    assert ph.substitutions("api.test") == [(env["TOKEN"].encode(), b"real-value-123")]
    assert ph.substitutions("a.svc.test")
    assert ph.substitutions("other.test") == []
    assert SecretPlaceholders(p).guest_env()["TOKEN"] != env["TOKEN"]  # per sandbox
    assert p.needs_interception("api.test") and not p.needs_interception("other.test")


def test_policy_is_frozen() -> None:
    p = EgressPolicy(allowed_domains=["a.com"])
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        p.allow_private = True  # type: ignore[misc]
