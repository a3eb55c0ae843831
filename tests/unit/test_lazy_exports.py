"""Both packages export their whole public API lazily, and importing one layer stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import exec_sandbox
import smartvm


@pytest.mark.parametrize("package", [smartvm, exec_sandbox])
def test_every_public_name_resolves(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert len(set(names)) == len(names), "duplicate names in __all__"
    for name in names:
        assert getattr(package, name) is not None, name
    assert sorted(names) == dir(package)


@pytest.mark.parametrize("package", [smartvm, exec_sandbox])
def test_unknown_name_is_an_attribute_error(package: object) -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        package.Nope  # type: ignore[attr-defined]  # noqa: B018


def test_importing_the_qemu_layer_does_not_load_netlink_or_http() -> None:
    code = "import sys, smartvm.qemu; print(sorted(m for m in ('pyroute2', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
