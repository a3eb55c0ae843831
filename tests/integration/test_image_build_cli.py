"""`sbx images list/prune` against a private images dir (apt is queried to know what is current)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from exec_sandbox.cli import main
from exec_sandbox.settings import Settings
from exec_sandbox.vm_manager import VmManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_list_and_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shared = VmManager(Settings()).get_bundle("raw")
    kernel_dir = shared.kernel.parent
    shutil.copytree(kernel_dir, images / kernel_dir.name)
    kjson = images / kernel_dir.name / "kernel.json"
    kjson.write_text(kjson.read_text().replace(str(kernel_dir), str(images / kernel_dir.name)))
    monkeypatch.setenv("EXEC_SANDBOX_IMAGES_DIR", str(images))
    current = VmManager(Settings()).get_bundle("raw")
    assert current.directory.parent == images

    # A bundle of an old recipe, and a leftover of a build whose process is gone.
    stale = images / "raw-0000000000000000"
    shutil.copytree(current.directory, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["recipe_hash"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    leftover = images / ".raw-1111111111111111.tmp-999999999"
    leftover.mkdir()

    runner = CliRunner()
    listed = runner.invoke(main, ["images", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.output)}
    assert rows[current.directory.name]["current"] is True
    assert rows[kernel_dir.name]["current"] is True
    assert rows[stale.name]["current"] is False

    dry = runner.invoke(main, ["images", "prune", "--dry-run"])
    assert dry.exit_code == 0 and stale.exists() and leftover.exists()
    pruned = runner.invoke(main, ["images", "prune"])
    assert pruned.exit_code == 0, pruned.output
    assert not stale.exists() and not leftover.exists()
    assert current.rootfs.exists() and (images / kernel_dir.name).exists()
