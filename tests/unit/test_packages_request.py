"""``packages=`` input checks (pure): what is accepted, what is refused and how it is named."""

from __future__ import annotations

import pytest

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.packages import LockedPackage, PackageLock, parse_packages
from exec_sandbox.packages.request import MAX_PACKAGES

_SHA = "a" * 64


def test_none_and_empty_mean_no_packages() -> None:
    assert parse_packages("python", None) is None
    assert parse_packages("python", []) is None
    assert parse_packages("raw", None) is None


def test_python_requirements_are_kept_as_given() -> None:
    request = parse_packages("python", ["six", " attrs>=23 ", "Foo_Bar[extra]==1.0; python_version>'3'"])
    assert request is not None and request.ecosystem == "pip" and request.lock is None
    assert request.specs == ("six", "attrs>=23", "Foo_Bar[extra]==1.0; python_version>'3'")
    assert request.names == ["six", "attrs", "foo-bar"]


def test_exact_pins_with_hashes_are_a_lock() -> None:
    request = parse_packages(
        "python", [f"six==1.16.0 --hash=sha256:{_SHA}", f"Attrs==23.1 --hash=sha256:{_SHA}"]
    )
    assert request is not None and request.lock is not None and request.specs == ()
    assert request.lock.versions() == {"six": "1.16.0", "attrs": "23.1"}
    assert request.lock.target == ""  # valid for any guest until checked against one


def test_a_pin_list_mixing_hashed_and_unhashed_is_resolved() -> None:
    request = parse_packages("python", [f"six==1.16.0 --hash=sha256:{_SHA}", "attrs"])
    assert request is not None and request.lock is None and len(request.specs) == 2


@pytest.mark.parametrize(
    "spec",
    [
        "--index-url=http://evil.example/simple",
        "-i http://evil.example",
        "-r /etc/passwd",
        "six @ https://example.org/six.whl",
        "six @ file:///tmp/six.whl",
        "six\n--extra-index-url x",
        "not a requirement!!",
        f"six>=1 --hash=sha256:{_SHA}",
        "",
        "x" * 300,
    ],
)
def test_python_refusals_name_the_field_and_package(spec: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        parse_packages("python", [spec])
    assert info.value.context["field"] == "packages"


@pytest.mark.parametrize(
    "spec", ["lodash", "lodash@4", "lodash@^4.17.0", "@types/node@20", "left-pad@1.x || 2"]
)
def test_npm_specs(spec: str) -> None:
    request = parse_packages("javascript", [spec])
    assert request is not None and request.ecosystem == "npm" and request.specs == (spec,)


@pytest.mark.parametrize(
    "spec",
    [
        "lodash@file:../x",
        "lodash@git+https://x/y.git",
        "x@http://evil/x.tgz",
        "../local",
        "Lodash",
        "lodash@npm:evil@1",
        "--registry=http://evil",
    ],
)
def test_npm_refusals(spec: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        parse_packages("javascript", [spec])
    assert info.value.context == {"field": "packages", "package": spec}


def test_wrong_shapes_and_languages() -> None:
    with pytest.raises(SandboxInputError, match="list of requirement strings"):
        parse_packages("python", "six")  # a bare string is not a list of them
    with pytest.raises(SandboxInputError, match="each package must be a string"):
        parse_packages("python", [b"six"])  # type: ignore[list-item]
    with pytest.raises(SandboxInputError, match="not 'raw'"):
        parse_packages("raw", ["six"])
    with pytest.raises(SandboxInputError, match=f"at most {MAX_PACKAGES}"):
        parse_packages("python", [f"p{i}" for i in range(MAX_PACKAGES + 1)])
    npm_lock = PackageLock(ecosystem="npm", target="t", packages=(LockedPackage(name="a", version="1"),))
    with pytest.raises(SandboxInputError, match="npm lock cannot be installed for language 'python'"):
        parse_packages("python", npm_lock)


def test_a_lock_object_is_taken_as_is() -> None:
    lock = PackageLock(
        ecosystem="pip",
        target="cp311-x",
        packages=(LockedPackage(name="six", version="1.0", sha256=_SHA, requested=True),),
    )
    request = parse_packages("python", lock)
    assert request is not None and request.lock is lock
