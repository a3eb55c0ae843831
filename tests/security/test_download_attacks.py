"""Downloads written through planted symlinks: ``sbx run --download`` (``write_download``) as the target.

The other user controls a directory the download goes into (a shared project directory, ``0777``),
and plants symlinks pointing at a file of ours: at the predictable temporary name the old code used
(``.<name>.sbx-<pid>``; pids are public) and at the final path. The guest's bytes must never land
in our file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exec_sandbox.cli.args import Download, plan_downloads, write_download
from exec_sandbox.errors import SandboxInputError
from tests.security.conftest import Attacker

_SYMLINK = "import os, sys; os.symlink(sys.argv[1], sys.argv[2])"


def test_symlink_at_the_predictable_temp_name_does_not_redirect_a_download(
    attacker: Attacker, shared_open_dir: Path, victim_file: Path
) -> None:
    target = shared_open_dir / "out.bin"
    for pid in {os.getpid(), os.getpid() + 1}:
        attacker.python(_SYMLINK, str(victim_file), str(shared_open_dir / f".out.bin.sbx-{pid}"))
    write_download(b"guest bytes", target, force=False)
    assert victim_file.read_text() == "precious\n"
    assert target.read_bytes() == b"guest bytes" and not target.is_symlink()
    assert target.stat().st_mode & 0o077 == 0  # what the guest produced stays ours


@pytest.mark.parametrize("force", [False, True])
def test_symlink_at_the_download_target_is_refused(
    attacker: Attacker, shared_open_dir: Path, victim_file: Path, force: bool
) -> None:
    target = shared_open_dir / "out.bin"
    attacker.python(_SYMLINK, str(victim_file), str(target))
    with pytest.raises(SandboxInputError, match="symbolic link"):
        plan_downloads([Download("out.bin", target)], force=force)
    with pytest.raises(SandboxInputError, match="symbolic link"):
        write_download(b"guest bytes", target, force=force)  # planted after the plan: still refused
    assert victim_file.read_text() == "precious\n"
    assert target.is_symlink()  # left as it was: the user decides
    assert [p.name for p in shared_open_dir.iterdir()] == ["out.bin"]  # no temporary file left behind
