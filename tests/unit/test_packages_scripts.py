"""Console scripts of staged Python packages: shebang rewrite and the move to usr/local/bin."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from exec_sandbox.packages.scripts import entry_point_names, install_console_scripts, retarget_shebang

_LAUNCHER = b"# -*- coding: utf-8 -*-\nimport sys\nfrom black import main\nsys.exit(main())\n"
_GUEST = "/usr/bin/python3"


def test_a_host_shebang_becomes_the_guest_interpreter() -> None:
    data = b"#!/work/main/.venv/bin/python3.12\n" + _LAUNCHER
    assert retarget_shebang(data, _GUEST) == b"#!/usr/bin/python3\n" + _LAUNCHER


def test_pips_long_path_trampoline_is_replaced_whole() -> None:
    data = b"#!/bin/sh\n'''exec' \"/very/long/path/bin/python\" \"$0\" \"$@\"\n' '''\n" + _LAUNCHER
    assert retarget_shebang(data, _GUEST) == b"#!/usr/bin/python3\n" + _LAUNCHER


@pytest.mark.parametrize(
    "data",
    [
        b"#!/bin/sh\necho pwned\n",  # a shell script, not a pip launcher
        b"#!/bin/sh\n'''exec' python\n",  # truncated trampoline
        b"import os\n",  # no shebang
        b"#!/usr/bin/python3",  # no newline: no body
        b"",
    ],
)
def test_anything_but_a_python_launcher_is_refused(data: bytes) -> None:
    assert retarget_shebang(data, _GUEST) is None


def _dist(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "entry_points.txt").write_text(entry_points)


def _launcher(site: Path, name: str, body: bytes = _LAUNCHER) -> Path:
    (site / "bin").mkdir(exist_ok=True)
    path = site / "bin" / name
    path.write_bytes(b"#!/host/python\n" + body)
    path.chmod(0o755)
    return path


def test_entry_point_names_are_the_scripts_of_the_installed_dists(tmp_path: Path) -> None:
    _dist(tmp_path, "black", "[console_scripts]\nblack = black:main\nBlackd = blackd:main\n[x]\nno = a:b\n")
    _dist(tmp_path, "gui", "[gui_scripts]\ngui-app = gui:main\n")
    _dist(tmp_path, "bad", "[console_scripts]\n../escape = bad:main\nsub/dir = bad:main\n")
    _dist(tmp_path, "broken", "not an ini file [")
    assert entry_point_names(tmp_path) == ["Blackd", "black", "gui-app"]


def test_scripts_move_to_usr_local_bin_retargeted_and_bin_is_dropped(tmp_path: Path) -> None:
    site, tree = tmp_path / "tree/usr/local/lib/python3.11/dist-packages", tmp_path / "tree"
    site.mkdir(parents=True)
    _dist(site, "black", "[console_scripts]\nblack = black:main\n")
    _launcher(site, "black")
    _launcher(site, "stray")  # in bin/ but no entry point declares it
    assert install_console_scripts(site, tree, _GUEST) == ["black"]
    script = tree / "usr/local/bin/black"
    assert script.read_bytes() == b"#!/usr/bin/python3\n" + _LAUNCHER
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert sorted(p.name for p in (tree / "usr/local/bin").iterdir()) == ["black"]
    assert not (site / "bin").exists()


def test_symlinks_and_non_launchers_are_not_installed(tmp_path: Path) -> None:
    site, tree = tmp_path / "site", tmp_path / "tree"
    site.mkdir()
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"#!/usr/bin/python3\nTOKEN\n")
    _dist(site, "evil", "[console_scripts]\nlink = a:b\nshell = a:b\ndir = a:b\nmissing = a:b\n")
    (site / "bin").mkdir()
    os.symlink(secret, site / "bin" / "link")
    _launcher(site, "shell").write_bytes(b"#!/bin/sh\necho hi\n")
    (site / "bin" / "dir").mkdir()
    assert install_console_scripts(site, tree, _GUEST) == []
    assert not (tree / "usr/local/bin").exists() or not any((tree / "usr/local/bin").iterdir())
    assert not (site / "bin").exists() and secret.exists()


def test_a_symlinked_bin_dir_is_dropped_not_followed(tmp_path: Path) -> None:
    site, tree, elsewhere = tmp_path / "site", tmp_path / "tree", tmp_path / "elsewhere"
    site.mkdir()
    elsewhere.mkdir()
    (elsewhere / "tool").write_bytes(b"#!/host/python\n" + _LAUNCHER)
    _dist(site, "t", "[console_scripts]\ntool = t:main\n")
    os.symlink(elsewhere, site / "bin")
    assert install_console_scripts(site, tree, _GUEST) == []
    assert not (site / "bin").exists() and (elsewhere / "tool").exists()
    assert not (tree / "usr/local/bin").exists()


def test_no_bin_dir_installs_nothing(tmp_path: Path) -> None:
    _dist(tmp_path, "lib", "[console_scripts]\ntool = t:main\n")
    assert install_console_scripts(tmp_path, tmp_path / "tree", _GUEST) == []
