"""E2B's network fields of a create, as the e2b SDK's own API models put them on the wire, mapped onto
our egress allowlist (``exec_sandbox.server.network``), and the server-side egress settings."""

from __future__ import annotations

from typing import Any

import pytest
from e2b.api.client.models import NewSandbox, SandboxNetworkConfig

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.server.config import load_serve_config
from exec_sandbox.server.control import NewSandboxBody
from exec_sandbox.server.errors import BadRequestError, status_for
from exec_sandbox.server.network import allowed_domains_for


def _wire(**kwargs: Any) -> NewSandboxBody:
    """The body the SDK sends for these NewSandbox fields, read by our model."""
    body = NewSandbox(template_id="base", **kwargs).to_dict()
    return NewSandboxBody.model_validate(body)


def _domains(body: NewSandboxBody) -> tuple[str, ...]:
    return allowed_domains_for(body.allow_internet_access, body.network)


def test_allow_out_names_become_the_allowlist_and_deny_all_next_to_them_changes_nothing() -> None:
    net = SandboxNetworkConfig(allow_out=["API.example.com", "*.pypi.test"], deny_out=["0.0.0.0/0"])
    assert _domains(_wire(network=net)) == ("api.example.com", "*.pypi.test")
    # allowOut wins over allow_internet_access (E2B: allowed entries take precedence)
    net = SandboxNetworkConfig(allow_out=["web.test"])
    assert _domains(_wire(network=net, allow_internet_access=False)) == ("web.test",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"allow_internet_access": False},
        {"network": SandboxNetworkConfig(deny_out=["0.0.0.0/0"])},
        {"network": SandboxNetworkConfig(allow_out=[], allow_public_traffic=True)},
    ],
)
def test_no_list_means_no_network(kwargs: dict[str, Any]) -> None:
    assert _domains(_wire(**kwargs)) == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"allow_internet_access": True}, "allow_internet_access"),
        ({"network": SandboxNetworkConfig(deny_out=["10.0.0.0/8"])}, "network.denyOut"),
        ({"network": SandboxNetworkConfig(allow_out=["0.0.0.0/0"])}, "network.allowOut"),
        ({"network": SandboxNetworkConfig(allow_out=["web.test", "192.0.2.7"])}, "network.allowOut"),
    ],
)
def test_internet_without_a_list_is_a_400_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequestError) as info:
        _domains(_wire(**kwargs))
    assert info.value.context["field"] == field
    assert "only allowlisted egress" in info.value.message
    assert info.value.body() == {"code": 400, "message": info.value.message}


def test_features_we_do_not_have_are_refused_not_ignored() -> None:
    body = NewSandboxBody.model_validate(
        {"templateID": "base", "network": {"allowOut": ["web.test"], "rules": {"web.test": [{}]}}}
    )
    with pytest.raises(BadRequestError, match=r"network\.rules"):
        _domains(body)
    body = NewSandboxBody.model_validate(
        {"templateID": "base", "network": {"allowOut": ["web.test"], "egressProxy": {"url": "x"}}}
    )
    with pytest.raises(BadRequestError, match=r"network\.egressProxy"):
        _domains(body)


def test_a_bad_name_is_a_400_naming_allow_out() -> None:
    with pytest.raises(SandboxInputError) as info:
        _domains(_wire(network=SandboxNetworkConfig(allow_out=["bad name!"])))
    assert info.value.context["field"] == "network.allowOut"
    assert status_for(info.value) == 400


def test_egress_resolution_is_server_config() -> None:
    config = load_serve_config(
        api_keys=["k"], environ={}, host_overrides={"web.test": "127.0.0.1"}, egress_allow_private=True
    )
    scheduler = config.scheduler_config()
    assert scheduler.host_overrides == {"web.test": "127.0.0.1"} and scheduler.egress_allow_private
    default = load_serve_config(api_keys=["k"], environ={}).scheduler_config()
    assert default.host_overrides == {} and default.egress_allow_private is False


@pytest.mark.parametrize("overrides", [{"web.test": "not-an-ip"}, {"bad name!": "127.0.0.1"}])
def test_a_bad_host_override_fails_at_load_naming_it(overrides: dict[str, str]) -> None:
    with pytest.raises(SandboxInputError, match="host_overrides"):
        load_serve_config(api_keys=["k"], environ={}, host_overrides=overrides)


def test_sbx_mcp_reads_the_scheduler_env_and_names_a_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from exec_sandbox.server.cli import mcp

    monkeypatch.setenv("EXEC_SANDBOX_SCHEDULER_HOST_OVERRIDES", "{not json")
    result = CliRunner().invoke(mcp, [])
    assert result.exit_code == 2
    assert "EXEC_SANDBOX_SCHEDULER_HOST_OVERRIDES: invalid JSON" in result.output
