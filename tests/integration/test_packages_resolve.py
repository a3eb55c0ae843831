"""Real pip and npm on the host against an index/registry the test serves on 127.0.0.1 (no VM).

Resolution for the guest's platform, exact locks with hashes, hash-checked installs into a host
tree, the ext4 package disk, and every refusal as a typed error naming the package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox.errors import PackageFetchError, PackageResolutionError, SandboxInputError
from exec_sandbox.packages import GuestTarget, PackageLock, parse_packages
from exec_sandbox.packages.disk import MARKER, TREE_DIR
from exec_sandbox.packages.staging import lock_for, stage_disk
from tests.integration.package_index import LocalIndex, serve_index

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TARGET = GuestTarget(arch="x86_64", python_version="3.11", glibc="2.36", node_version="18.19")
_NPM = shutil.which("npm")


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalIndex]:
    with serve_index(LocalIndex(tmp_path)) as idx:
        idx.add_wheel("sbxdep", "0.3")
        idx.add_wheel("sbxdemo", "1.0")
        idx.add_wheel("sbxdemo", "2.0", requires=("sbxdep>=0.2",))
        idx.add_wheel("sbxwin", "1.0", tag="cp311-cp311-win_amd64")  # no wheel for the guest
        idx.add_wheel("sbxpins", "1.0", requires=("sbxdep<0.2",))  # conflicts with sbxdemo 2.0
        idx.add_sdist("sbxsrc", "1.0")  # would need a build: refused, never built on the host
        idx.add_wheel("sbxbin", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")  # an older glibc's wheel
        idx.add_wheel("sbxbin", "2.0", tag="cp311-cp311-manylinux_2_39_x86_64")  # too new for the guest
        idx.add_npm("sbxleft", "1.2.0", main="module.exports = (s, n) => s.padStart(n);")
        idx.add_npm(
            "sbxpad", "2.0.1", main="module.exports = require('sbxleft');", dependencies={"sbxleft": "^1"}
        )
        idx.add_npm("sbxgyp", "1.0.0", main="", scripts={"install": "node-gyp rebuild"})
        for key, value in idx.env().items():
            monkeypatch.setenv(key, value)
        yield idx


async def test_resolve_gives_exact_versions_and_hashes_for_the_guest(
    index: LocalIndex, tmp_path: Path
) -> None:
    request = parse_packages("python", ["sbxdemo"])
    assert request is not None
    lock = await lock_for(request, TARGET, tmp_path)
    assert lock.versions() == {"sbxdemo": "2.0", "sbxdep": "0.3"}
    assert lock.target == "cp311-manylinux_2_36_x86_64"
    by_name = {p.name: p for p in lock.packages}
    assert by_name["sbxdemo"].requested and not by_name["sbxdep"].requested
    import hashlib

    for name, files in index.wheels.items():
        for _, data in files:
            digest = hashlib.sha256(data).hexdigest()
            if name in by_name and by_name[name].version in _.split("-")[1]:
                assert by_name[name].sha256 == digest


async def test_platform_wheels_for_the_guests_glibc_and_older(index: LocalIndex, tmp_path: Path) -> None:
    lock = await lock_for(parse_packages("python", ["sbxbin"]), TARGET, tmp_path)  # type: ignore[arg-type]
    assert lock.versions() == {"sbxbin": "1.0"}  # 2.0 needs glibc 2.39, the guest has 2.36


async def test_lock_pins_reproduce_the_lock_without_resolving(index: LocalIndex, tmp_path: Path) -> None:
    first = await lock_for(parse_packages("python", ["sbxdemo"]), TARGET, tmp_path)  # type: ignore[arg-type]
    request = parse_packages("python", first.pins())
    assert request is not None and request.lock is not None
    index.hits.clear()
    again = await lock_for(request, TARGET, tmp_path)
    assert again.digest() == first.digest()
    assert index.hits == []  # a lock is not resolved again


@pytest.mark.parametrize(
    ("specs", "package", "reason"),
    [
        (["sbx-no-such-package"], "sbx-no-such-package", "no matching distribution"),
        (["sbxdemo==9.9"], "sbxdemo==9.9", "no matching distribution"),
        (["sbxwin"], "sbxwin", "no matching distribution"),
        (["sbxsrc"], "sbxsrc", "no matching distribution"),
        (["sbxdemo==2.0", "sbxpins"], None, "conflict"),
    ],
)
async def test_unresolvable_requests_name_the_package(
    index: LocalIndex, tmp_path: Path, specs: list[str], package: str | None, reason: str
) -> None:
    with pytest.raises(PackageResolutionError) as info:
        await lock_for(parse_packages("python", specs), TARGET, tmp_path)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, SandboxInputError)
    assert err.reason == reason and err.context["field"] == "packages"
    if package is not None:
        assert err.package == package and package in err.message
    else:
        assert err.package == "sbxdemo==2.0 and sbxpins==1.0"
        assert "sbxdep" in err.message  # pip's cause: the two need different sbxdep versions
    if specs in (["sbxwin"], ["sbxsrc"]):
        assert "cp311-manylinux_2_36_x86_64" in err.message and "sdists are not built" in err.message
    if specs == ["sbx-no-such-package"]:
        assert "no such package" in err.message


async def test_unreachable_index_is_a_transient_error_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_index(LocalIndex(tmp_path)) as idx:
        env = idx.env()
    for key, value in env.items():  # the server is gone: its port refuses connections
        monkeypatch.setenv(key, value)
    calls: list[str] = []
    from exec_sandbox.packages import pip

    real = pip.resolve

    async def counting(*args: object, **kwargs: object) -> PackageLock:
        calls.append("resolve")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pip, "resolve", counting)
    with pytest.raises(PackageFetchError) as info:
        request = parse_packages("python", ["sbxdemo"])
        assert request is not None
        await lock_for(request, TARGET, tmp_path, attempts=2)
    assert len(calls) == 2
    assert "Connection refused" in info.value.stderr or "NewConnectionError" in info.value.stderr


async def test_stage_disk_installs_verified_wheels_into_an_ext4_image(
    index: LocalIndex, tmp_path: Path
) -> None:
    lock = await lock_for(parse_packages("python", ["sbxdemo"]), TARGET, tmp_path)  # type: ignore[arg-type]
    work = tmp_path / "stage"
    work.mkdir()
    image = await stage_disk(lock, TARGET, work)
    site = f"{TREE_DIR}/usr/local/lib/python3.11/dist-packages"
    listing = _debugfs(image, f"ls -l {site}")
    assert "sbxdemo" in listing and "sbxdep" in listing
    assert MARKER in _debugfs(image, "ls -l /")
    init = _debugfs(image, f"cat {site}/sbxdemo/__init__.py")
    assert "__version__ = '2.0'" in init
    if sys.version_info[:2] == (3, 11):  # byte code made on the host for the same Python
        assert "cpython-311" in _debugfs(image, f"ls -l {site}/sbxdemo/__pycache__")


async def test_a_lock_whose_hash_the_index_does_not_serve_is_refused(
    index: LocalIndex, tmp_path: Path
) -> None:
    lock = await lock_for(parse_packages("python", ["sbxdep"]), TARGET, tmp_path)  # type: ignore[arg-type]
    (only,) = lock.packages
    forged = lock.model_copy(update={"packages": (only.model_copy(update={"sha256": "0" * 64}),)})
    work = tmp_path / "stage"
    work.mkdir()
    with pytest.raises(PackageResolutionError) as info:
        await stage_disk(forged, TARGET, work, attempts=1)
    assert info.value.reason == "hash mismatch" and info.value.package == "sbxdep"


def _debugfs(image: Path, command: str) -> str:
    out = subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True)
    return out.stdout


# ---------------------------------------------------------------------------------------------- npm

needs_npm = pytest.mark.skipif(_NPM is None, reason="npm is not installed on this host")


@needs_npm
async def test_npm_resolve_and_install(index: LocalIndex, tmp_path: Path) -> None:
    lock = await lock_for(parse_packages("javascript", ["sbxpad@2"]), TARGET, tmp_path)  # type: ignore[arg-type]
    assert lock.versions() == {"sbxpad": "2.0.1", "sbxleft": "1.2.0"}
    assert all(p.integrity and p.integrity.startswith("sha512-") for p in lock.packages)
    assert lock.pins() == ["sbxpad@2.0.1"]
    work = tmp_path / "stage"
    work.mkdir()
    image = await stage_disk(lock, TARGET, work)
    listing = _debugfs(image, f"ls -l {TREE_DIR}/home/sandbox/node_modules")
    assert "sbxpad" in listing and "sbxleft" in listing
    meta = json.loads(_debugfs(image, f"cat {TREE_DIR}/home/sandbox/node_modules/sbxpad/package.json"))
    assert meta["version"] == "2.0.1"


@needs_npm
@pytest.mark.parametrize(
    ("spec", "package", "reason"),
    [
        ("sbx-nope@1", "sbx-nope", "not found"),
        ("sbxleft@^9", "sbxleft@^9", "no such version"),
        ("sbxgyp", "sbxgyp", "install scripts"),
    ],
)
async def test_npm_refusals(index: LocalIndex, tmp_path: Path, spec: str, package: str, reason: str) -> None:
    with pytest.raises(PackageResolutionError) as info:
        await lock_for(parse_packages("javascript", [spec]), TARGET, tmp_path)  # type: ignore[arg-type]
    assert info.value.reason == reason, info.value.stderr
    assert info.value.package == package


# --------------------------------------------------------------------------- the host's own config


async def test_host_configured_index_resolves_six(tmp_path: Path) -> None:
    """The user's real pip configuration (whatever index it names), untouched by the test."""
    request = parse_packages("python", ["six"])
    assert request is not None
    try:
        lock = await lock_for(request, TARGET, tmp_path, attempts=1)
    except (PackageFetchError, PackageResolutionError) as exc:
        pytest.skip(f"the host's configured pip index cannot serve six here: {exc.message}")
    assert list(lock.versions()) == ["six"]
    assert lock.packages[0].sha256 is not None


async def test_an_install_beyond_the_size_cap_is_refused(index: LocalIndex, tmp_path: Path) -> None:
    from exec_sandbox.packages.disk import make_package_disk

    root = tmp_path / "root"
    (root / TREE_DIR / "usr").mkdir(parents=True)
    (root / TREE_DIR / "usr" / "big.bin").write_bytes(b"\0" * (64 << 10))
    with pytest.raises(PackageResolutionError, match="more than 0 MiB") as info:
        await make_package_disk(root, tmp_path / "d.ext4", max_bytes=32 << 10, packages="big")
    assert info.value.reason == "too large" and info.value.package == "big"
    assert not (tmp_path / "d.ext4").exists()
