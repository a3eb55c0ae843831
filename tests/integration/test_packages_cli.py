"""``sbx run --package`` end to end: the real console script, an index served on 127.0.0.1, real VMs."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox.settings import Settings
from tests.integration.package_index import LocalIndex, serve_index
from tests.integration.test_cli_run import Sbx

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def sbx(tmp_path: Path) -> Iterator[tuple[Sbx, dict[str, str]]]:
    runtime_dir = Path(tempfile.mkdtemp(prefix="sbxp-", dir="/tmp"))
    work = tmp_path / "work"
    work.mkdir()
    (runtime_dir / "tmp").mkdir()
    try:
        with serve_index(LocalIndex(tmp_path)) as idx:
            idx.add_wheel("sbxdemo", "2.0")
            env = {
                **idx.env(),
                # Private layer and snapshot caches; the images stay where they are (no rebuild).
                "EXEC_SANDBOX_CACHE_DIR": str(tmp_path / "cache"),
                "EXEC_SANDBOX_IMAGES_DIR": str(Settings().images_dir),
            }
            yield Sbx(runtime_dir, work), env
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_package_progress_then_cached_layer(sbx: tuple[Sbx, dict[str, str]]) -> None:
    cli, env = sbx
    first = cli.run("-p", "sbxdemo", "import sbxdemo; print(sbxdemo.__version__)", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "2.0\n"
    for step in ("resolving packages", "downloading packages", "installing packages", "snapshotting"):
        assert step in first.stderr, first.stderr
    second = cli.run("--json", "-q", "--package", "sbxdemo", "import sbxdemo; print(1)", env=env)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["packages_cache_hit"] is True
    assert [(p["name"], p["version"]) for p in result["packages"]["packages"]] == [("sbxdemo", "2.0")]


@pytest.mark.parametrize(
    ("spec", "error"),
    [("--package=--index-url=http://127.0.0.1:1/", "SandboxInputError"),
     ("--package=sbx-not-there", "PackageResolutionError")],
)
def test_bad_package_exits_126_before_any_vm(sbx: tuple[Sbx, dict[str, str]], spec: str, error: str) -> None:
    cli, env = sbx
    proc = cli.run(spec, "print(1)", env=env)
    assert proc.returncode == 126, proc.stderr
    assert f"sbx: error: {error}" in proc.stderr and "packages" in proc.stderr
    assert proc.stdout == ""
