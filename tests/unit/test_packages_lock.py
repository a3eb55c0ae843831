"""The lock model, the guest target and the pure halves of the pip/npm steps."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from exec_sandbox.errors import PackageFetchError, PackageResolutionError, SandboxInputError
from exec_sandbox.packages import GuestTarget, LockedPackage, PackageLock, guest_target, npm, pip
from exec_sandbox.packages.disk import build_mkfs_argv, disk_size_for
from exec_sandbox.packages.layers import LayerKeyInputs

TARGET = GuestTarget(arch="x86_64", python_version="3.11", glibc="2.36", node_version="18.19")
_SHA = "b" * 64


def test_guest_target_from_the_image_manifest() -> None:
    debs = [
        ("libc6", "2.36-9+deb12u14"),
        ("python3.11", "3.11.2-6"),
        ("python3", "3.11.2-1+b1"),
        ("nodejs", "18.19.0+dfsg-6~deb12u2"),
        ("libpython3.11-minimal", "3.11.2-6"),
    ]
    target = guest_target("x86_64", debs)
    assert target == TARGET
    assert (target.abi, target.platform) == ("cp311", "manylinux_2_36_x86_64")
    assert target.python_site_packages == "usr/local/lib/python3.11/dist-packages"
    assert target.label("pip") == "cp311-manylinux_2_36_x86_64"
    assert target.label("npm") == "node18.19-linux-x86_64"
    assert guest_target("amd64", [("libc6", "2.31-1")]).platform == "manylinux_2_31_x86_64"


def test_lock_digest_is_its_identity() -> None:
    a = PackageLock(
        ecosystem="pip",
        target="t",
        packages=(
            LockedPackage(name="six", version="1.0", sha256=_SHA, requested=True),
            LockedPackage(name="dep", version="2.0", sha256=_SHA),
        ),
    )
    reordered = a.model_copy(update={"packages": tuple(reversed(a.packages))})
    asked_differently = a.model_copy(
        update={"packages": tuple(p.model_copy(update={"requested": True}) for p in a.packages)}
    )
    assert a.digest() == reordered.digest() == asked_differently.digest()
    bumped = a.model_copy(
        update={"packages": (a.packages[0].model_copy(update={"version": "1.1"}), a.packages[1])}
    )
    other_target = a.model_copy(update={"target": "u"})
    assert len({a.digest(), bumped.digest(), other_target.digest()}) == 3
    assert a.pins() == [f"six==1.0 --hash=sha256:{_SHA}", f"dep==2.0 --hash=sha256:{_SHA}"]
    assert PackageLock.model_validate_json(a.model_dump_json()) == a
    with pytest.raises(SandboxInputError, match="made for t"):
        a.require_target("u")


def test_layer_key_changes_with_every_input() -> None:
    base = LayerKeyInputs(
        language="python", base_rootfs_sha256=_SHA, base_recipe_hash="r", target="t", lock_digest="d"
    )
    keys = {base.key()} | {
        base.model_copy(update={k: "x"}).key()
        for k in ("language", "base_rootfs_sha256", "base_recipe_hash", "target", "lock_digest")
    }
    assert len(keys) == 6


def test_pip_argv_asks_for_the_guest_and_names_no_index(tmp_path: Path) -> None:
    argv = pip.build_resolve_argv("/py", ["six"], TARGET, tmp_path / "r.json")
    assert argv[:4] == ["/py", "-m", "pip", "install"]
    for flag in ("--dry-run", "--ignore-installed", "--only-binary=:all:", "--report"):
        assert flag in argv
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--python-version"] == "3.11" and pairs["--abi"] == "cp311"
    assert pairs["--implementation"] == "cp"
    platforms = [b for a, b in itertools.pairwise(argv) if a == "--platform"]
    assert platforms[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in platforms
    assert "manylinux2014_x86_64" in platforms and "manylinux_2_37_x86_64" not in platforms
    assert argv[-2:] == ["--", "six"]  # a spec can never be read as an option
    install = pip.build_install_argv("/py", tmp_path / "req.txt", TARGET, tmp_path / "site")
    assert "--require-hashes" in install and "--no-deps" in install and "--target" in install
    assert not any("index" in a or "find-links" in a for a in argv + install)


def test_lock_from_pip_report() -> None:
    report = {
        "install": [
            {
                "metadata": {"name": "Foo_Bar", "version": "1.0"},
                "requested": True,
                "download_info": {"url": "x", "archive_info": {"hashes": {"sha256": _SHA}}},
            },
            {
                "metadata": {"name": "dep", "version": "2"},
                "requested": False,
                "download_info": {"url": "y", "archive_info": {"hash": f"sha256={_SHA}"}},
            },
        ]
    }
    lock = pip.lock_from_report(report, TARGET)
    assert lock.versions() == {"dep": "2", "foo-bar": "1.0"}
    assert [p.requested for p in lock.packages] == [False, True]
    assert pip.requirements_text(lock) == f"dep==2 --hash=sha256:{_SHA}\nfoo-bar==1.0 --hash=sha256:{_SHA}\n"
    no_hash = {"install": [{"metadata": {"name": "x", "version": "1"}, "download_info": {"url": "z"}}]}
    with pytest.raises(PackageResolutionError, match="no sha256"):
        pip.lock_from_report(no_hash, TARGET)


@pytest.mark.parametrize(
    ("stderr", "stdout", "kind", "package", "reason"),
    [
        (
            "ERROR: Could not find a version that satisfies the requirement six==9"
            " (from versions: 1.0, 1.1)\n"
            "ERROR: No matching distribution found for six==9\n",
            "",
            PackageResolutionError,
            "six==9",
            "no matching distribution",
        ),
        (
            "ERROR: Cannot install a==1 and b==2 because these package versions have"
            " conflicting dependencies.\n"
            "ERROR: ResolutionImpossible: ...\n",
            "The conflict is caused by:\n    a 1 depends on c<1\n    b 2 depends on c>=2\n",
            PackageResolutionError,
            "a==1 and b==2",
            "conflict",
        ),
        (
            "WARNING: Retrying (Retry(total=0, ...)) after connection broken by 'NewConnectionError(...)'\n"
            "ERROR: Could not find a version that satisfies the requirement six (from versions: none)\n",
            "",
            PackageFetchError,
            None,
            None,
        ),
        (
            "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n"
            "    six==1.0 from https://x/six.whl:\n        Expected sha256 0\n",
            "",
            PackageResolutionError,
            "six",
            "hash mismatch",
        ),
    ],
)
def test_pip_failures_are_typed(
    stderr: str, stdout: str, kind: type[Exception], package: str | None, reason: str | None
) -> None:
    err = pip.classify_pip_failure(stderr, ["x"], TARGET, stdout)
    assert type(err) is kind
    if isinstance(err, PackageResolutionError):
        assert (err.package, err.reason) == (package, reason)
        assert err.context["field"] == "packages"
    if reason == "conflict":
        assert "c<1" in str(err) and "c>=2" in str(err)


def test_npm_lockfile_to_lock_and_install_scripts_refused() -> None:
    lockfile = {
        "lockfileVersion": 3,
        "packages": {
            "": {"dependencies": {"a": "^1"}},
            "node_modules/a": {"version": "1.2.0", "integrity": "sha512-AA=="},
            "node_modules/a/node_modules/b": {"version": "0.1.0", "integrity": "sha512-BB=="},
        },
    }
    lock = npm.lock_from_lockfile(json.dumps(lockfile), ["a"], TARGET)
    assert lock.versions() == {"a": "1.2.0", "b": "0.1.0"} and lock.pins() == ["a@1.2.0"]
    assert lock.npm_lockfile is not None and lock.target == "node18.19-linux-x86_64"
    lockfile["packages"]["node_modules/a"]["hasInstallScript"] = True  # type: ignore[index]
    with pytest.raises(PackageResolutionError, match="install scripts") as info:
        npm.lock_from_lockfile(json.dumps(lockfile), ["a"], TARGET)
    assert info.value.package == "a"


@pytest.mark.parametrize(
    ("stderr", "kind", "package", "reason"),
    [
        (
            "npm error code E404\nnpm error 404 Not Found - GET http://127.0.0.1:1/nope - Not found\n",
            PackageResolutionError,
            "nope",
            "not found",
        ),
        (
            "npm error 404 Not Found - GET http://127.0.0.1:1/@scope%2fpkg - Not found\n",
            PackageResolutionError,
            "@scope/pkg",
            "not found",
        ),
        (
            "npm error code ETARGET\nnpm error notarget No matching version found for lodash@^99.\n",
            PackageResolutionError,
            "lodash@^99",
            "no such version",
        ),
        ("npm error code ECONNREFUSED\nnpm error errno ECONNREFUSED\n", PackageFetchError, None, None),
    ],
)
def test_npm_failures_are_typed(
    stderr: str, kind: type[Exception], package: str | None, reason: str | None
) -> None:
    err = npm.classify_npm_failure(stderr, ["x"])
    assert type(err) is kind
    if isinstance(err, PackageResolutionError):
        assert (err.package, err.reason) == (package, reason)


def test_npm_argv_never_runs_scripts() -> None:
    assert "--ignore-scripts" in npm.build_lock_argv("npm") and "--package-lock-only" in npm.build_lock_argv(
        "npm"
    )
    assert npm.build_ci_argv("npm")[:2] == ["npm", "ci"] and "--ignore-scripts" in npm.build_ci_argv("npm")
    assert json.loads(npm.manifest_for({"a": "^1"}))["dependencies"] == {"a": "^1"}


def test_package_disk_size_and_mkfs_argv(tmp_path: Path) -> None:
    small, big = disk_size_for(10, 10), disk_size_for(100_000, 10)
    assert small % 4096 == 0 and big > 100_000 * 4096 > small
    argv = build_mkfs_argv("mkfs.ext4", tmp_path, tmp_path / "d.ext4", big, 1234)
    assert argv[argv.index("-d") + 1] == str(tmp_path) and argv[-1] == f"{big // 1024}k"
    assert "^has_journal" in argv and argv[argv.index("-N") + 1] == "1234"
