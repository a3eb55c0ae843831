"""Input validation: every failure is a SandboxInputError naming the field and the offending value."""

from __future__ import annotations

import pytest

from exec_sandbox.errors import SandboxError, SandboxInputError
from exec_sandbox.models import PortForward
from exec_sandbox.validation import (
    MAX_CONTEXT_VALUE_CHARS,
    MAX_ENV_ENTRY_BYTES,
    MAX_ENV_TOTAL_BYTES,
    MAX_ENV_VARS,
    MAX_GUEST_PATH_BYTES,
    input_error,
    validate_code,
    validate_domain,
    validate_domains,
    validate_env_vars,
    validate_guest_path,
    validate_language,
    validate_memory_mb,
    validate_port_forwards,
    validate_timeout,
    validate_vcpus,
)


def fails(func: object, *args: object, **kwargs: object) -> SandboxInputError:
    with pytest.raises(SandboxInputError) as info:
        func(*args, **kwargs)  # type: ignore[operator]
    err = info.value
    assert isinstance(err, SandboxError) and isinstance(err, ValueError)
    assert "field" in err.context and "value" in err.context
    assert len(err.context["value"]) <= MAX_CONTEXT_VALUE_CHARS
    assert str(err).startswith(err.context["field"] + ":")
    return err


# --------------------------------------------------------------------------- language / code


@pytest.mark.parametrize("lang", ["python", "javascript", "raw"])
def test_languages(lang: str) -> None:
    assert validate_language(lang) == lang


@pytest.mark.parametrize("lang", ["Python", "js", "", None, 3, "bash"])
def test_unknown_language(lang: object) -> None:
    err = fails(validate_language, lang)
    assert err.context == {"field": "language", "value": repr(lang)}
    assert "python, javascript, raw" in err.message


def test_code_ok_and_size_counted_in_utf8_bytes() -> None:
    assert validate_code("print('hi')") == "print('hi')"
    assert validate_code("é" * 5, max_bytes=10) == "é" * 5
    err = fails(validate_code, "é" * 6, max_bytes=10)  # 6 chars, 12 bytes
    assert err.context["size_bytes"] == 12 and err.context["limit_bytes"] == 10
    assert err.context["field"] == "code"


def test_code_rejects_nul_non_str_and_surrogates() -> None:
    err = fails(validate_code, "abc\x00def")
    assert "NUL" in err.message and err.context["position"] == 3
    assert "bytes" in fails(validate_code, b"print(1)").message
    assert "Unicode" in fails(validate_code, "x = '\udcff'").message


def test_huge_code_value_is_truncated_in_context() -> None:
    err = fails(validate_code, "x" * 5000, max_bytes=100)
    assert err.context["value"].endswith("...")
    assert len(err.context["value"]) == MAX_CONTEXT_VALUE_CHARS


# --------------------------------------------------------------------------- env vars


def test_env_vars_ok() -> None:
    env = {"FOO": "bar", "_x1": "", "PATH": "/opt/bin:/usr/bin", "UNICODE": "ünï"}
    assert validate_env_vars(env) == env
    assert validate_env_vars(None) == {}


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "", "A=B", "ÄB", "A\x00"])
def test_env_var_bad_names(name: str) -> None:
    err = fails(validate_env_vars, {name: "x"})
    assert err.context["field"] == "env_vars"
    assert err.context["value"] == repr(name)


@pytest.mark.parametrize("name", ["SBX_REPL_IN", "SBX_ANYTHING", "PYTHONUNBUFFERED", "PS1", "PS2"])
def test_env_var_reserved_names(name: str) -> None:
    err = fails(validate_env_vars, {name: "1"})
    assert "reserved" in err.message
    assert err.context["value"] == repr(name)


def test_env_var_values() -> None:
    err = fails(validate_env_vars, {"A": "x\x00y"})
    assert err.context["field"] == "env_vars['A']" and "NUL" in err.message
    err = fails(validate_env_vars, {"A": 5})
    assert "str" in err.message
    err = fails(validate_env_vars, {"A": "\udc80"})
    assert "Unicode" in err.message
    # NAME=value must fit the kernel's per-string limit.
    assert validate_env_vars({"A": "x" * (MAX_ENV_ENTRY_BYTES - 2)})
    err = fails(validate_env_vars, {"A": "x" * (MAX_ENV_ENTRY_BYTES - 1)})
    assert err.context["size_bytes"] == MAX_ENV_ENTRY_BYTES + 1


def test_env_var_totals() -> None:
    too_many = {f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}
    err = fails(validate_env_vars, too_many)
    assert err.context["count"] == MAX_ENV_VARS + 1
    big = {f"V{i}": "x" * 100_000 for i in range(MAX_ENV_TOTAL_BYTES // 100_000 + 1)}
    err = fails(validate_env_vars, big)
    assert err.context["limit_bytes"] == MAX_ENV_TOTAL_BYTES
    fails(validate_env_vars, [("A", "b")])
    fails(validate_env_vars, {1: "x"})


# --------------------------------------------------------------------------- numbers


def test_timeout() -> None:
    assert validate_timeout(5) == 5.0
    assert validate_timeout(0.25) == 0.25
    assert validate_timeout(3600) == 3600.0
    for bad in (0, -1, float("inf"), float("nan"), True, "5", None):
        assert fails(validate_timeout, bad).context["field"] == "timeout_seconds"
    err = fails(validate_timeout, 3601)
    assert err.context["limit"] == 3600.0
    assert validate_timeout(7200, max_seconds=7200) == 7200.0


def test_memory() -> None:
    assert validate_memory_mb(64) == 64
    assert validate_memory_mb(16384) == 16384
    for bad in (63, 16385, 0, -5, 256.0, True, "256"):
        assert fails(validate_memory_mb, bad).context["field"] == "memory_mb"
    err = fails(validate_memory_mb, 1024, max_mb=512)
    assert (err.context["min"], err.context["max"]) == (64, 512)


def test_vcpus() -> None:
    assert validate_vcpus(1) == 1
    for bad in (0, 65, 1.0, False):
        fails(validate_vcpus, bad)


# --------------------------------------------------------------------------- guest paths


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.txt", "a.txt"),
        ("dir/sub/file", "dir/sub/file"),
        ("./a//b/", "a/b"),
        ("a/../b", "b"),
        ("/home/sandbox/out.csv", "out.csv"),
        ("/home/sandbox/x/../y", "y"),
        ("name with spaces/ü.txt", "name with spaces/ü.txt"),
    ],
)
def test_guest_paths_normalised(path: str, expected: str) -> None:
    assert validate_guest_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "..",
        "a/../../b",
        "/etc/passwd",
        "/home/sandboxx/a",
        "/home/sandbox/../root/x",
        "//home/sandbox/a",
        "/home",
    ],
)
def test_guest_paths_escaping_refused(path: str) -> None:
    err = fails(validate_guest_path, path)
    assert err.context == {"field": "path", "value": repr(path), "workdir": "/home/sandbox"}


def test_guest_path_other_failures() -> None:
    assert "empty" in fails(validate_guest_path, "").message
    assert "NUL" in fails(validate_guest_path, "a\x00b").message
    assert "str" in fails(validate_guest_path, b"a").message
    err = fails(validate_guest_path, "a/" * (MAX_GUEST_PATH_BYTES // 2) + "b")
    assert err.context["limit_bytes"] == MAX_GUEST_PATH_BYTES
    assert "component" in fails(validate_guest_path, "d/" + "x" * 256).message
    assert validate_guest_path("d/" + "x" * 255)
    # The work dir itself only where a directory is meant (list_files).
    assert "work dir itself" in fails(validate_guest_path, ".").message
    assert validate_guest_path(".", allow_workdir=True) == "."
    assert validate_guest_path("/home/sandbox", allow_workdir=True) == "."
    assert validate_guest_path("a/..", allow_workdir=True) == "."
    assert validate_guest_path("/work/x", workdir="/work/") == "x"
    assert fails(validate_guest_path, "../x", field="destination").context["field"] == "destination"


# --------------------------------------------------------------------------- port forwards


def test_port_forward_forms() -> None:
    got = validate_port_forwards(
        [
            80,
            "8080:80",
            "127.0.0.1:9000:90/udp",
            "[::1]:9001:91",
            {"guest_port": 22, "host_port": 2222},
            PortForward(guest_port=443),
        ]
    )
    assert got == (
        PortForward(guest_port=80),
        PortForward(guest_port=80, host_port=8080),
        PortForward(guest_port=90, host_port=9000, protocol="udp"),
        PortForward(guest_port=91, host_port=9001, host_addr="::1"),
        PortForward(guest_port=22, host_port=2222),
        PortForward(guest_port=443),
    )
    assert validate_port_forwards(None) == ()


@pytest.mark.parametrize(
    "bad",
    [
        [0],
        [70000],
        ["abc"],
        ["80:"],
        ["8080:80/sctp"],
        ["localhost:80:80"],
        [{"guest_port": 80, "extra": 1}],
        [True],
        [1.5],
        "8080:80",
        80,
    ],
)
def test_port_forward_bad(bad: object) -> None:
    err = fails(validate_port_forwards, bad)
    assert err.context["field"] == "port_forwards"


def test_port_forward_duplicates() -> None:
    err = fails(validate_port_forwards, ["8080:80", "8080:81"])
    assert "twice" in err.message
    # Same host port on different protocols or addresses is fine; so are several ephemeral ones.
    assert len(validate_port_forwards(["8080:80", "8080:80/udp", "127.0.0.2:8080:80", 22, 22])) == 5
    assert fails(validate_port_forwards, list(range(1, 70))).context["limit"] == 64


# --------------------------------------------------------------------------- domains


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", "example.com"),
        ("PyPI.org.", "pypi.org"),
        ("*.example.com", "*.example.com"),
        ("a-b.c1.io", "a-b.c1.io"),
        ("localhost", "localhost"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("  files.pythonhosted.org ", "files.pythonhosted.org"),
    ],
)
def test_domains_ok(domain: str, expected: str) -> None:
    assert validate_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "*.",
        "*.com",
        "a.*.com",
        "*example.com",
        "exa mple.com",
        "-bad.com",
        "bad-.com",
        "a..b",
        "x" * 64 + ".com",
        ".".join(["abcdefghi"] * 26),
        "1.2.3.4",
        "http://example.com",
        "example.com/path",
        "under_score.com",
    ],
)
def test_domains_bad(domain: str) -> None:
    err = fails(validate_domain, domain)
    assert err.context["field"] == "allowed_domains"
    assert (
        err.context["value"].removesuffix("...")
        == repr(domain)[: len(err.context["value"].removesuffix("..."))]
    )


def test_domain_list() -> None:
    assert validate_domains(["A.com", "a.com.", "*.b.org"]) == ("a.com", "*.b.org")
    assert validate_domains(None) == ()
    assert "single string" in fails(validate_domains, "example.com").message
    fails(validate_domains, [1])


def test_input_error_helper() -> None:
    err = input_error("x", "v" * 1000, "is wrong", limit=3)
    assert err.message == "x: is wrong"
    assert err.context["limit"] == 3 and err.context["value"].endswith("...")
