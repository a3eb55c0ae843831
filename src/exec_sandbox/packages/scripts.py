"""Console scripts of staged Python packages: retarget them at the guest's interpreter.

``pip install --target`` writes every ``console_scripts``/``gui_scripts`` entry point as a small
launcher in ``<target>/bin`` whose shebang names the HOST's interpreter (or, for a long path, a
``#!/bin/sh`` + ``'''exec' <python> "$0" "$@"`` trampoline). In the guest that interpreter does not
exist, so each launcher is rewritten to start with ``#!<guest python>`` and moved to the tree's
``usr/local/bin`` (on the guest's PATH). Only names the installed distributions declare as entry
points are taken, and only regular files: a symlink, a directory or a name with a path separator
is skipped, so a wheel cannot place anything else on the PATH through this step.
"""

from __future__ import annotations

import configparser
import logging
import os
import shutil
import stat
from pathlib import Path

__all__ = ["GUEST_SCRIPT_DIR", "entry_point_names", "install_console_scripts", "retarget_shebang"]

logger = logging.getLogger(__name__)

GUEST_SCRIPT_DIR = "usr/local/bin"
_SECTIONS = ("console_scripts", "gui_scripts")
_MAX_SCRIPT = 1 << 20  # pip's launchers are a few hundred bytes


def retarget_shebang(data: bytes, interpreter: str) -> bytes | None:
    """``data`` (a pip launcher) with its shebang replaced by ``#!<interpreter>``; None when
    ``data`` is not a launcher pip writes (no Python shebang). Pure."""
    first, sep, rest = data.partition(b"\n")
    if not sep or not first.startswith(b"#!"):
        return None
    if first.strip() == b"#!/bin/sh" and rest.startswith(b"'''exec' "):
        # pip's trampoline for an interpreter path too long for a shebang: drop its two lines
        _trampoline, sep, rest = rest.partition(b"\n")
        closing, sep2, rest = rest.partition(b"\n")
        if not sep or not sep2 or not closing.startswith(b"' '''"):
            return None
    elif b"python" not in first.rsplit(b"/", 1)[-1]:
        return None
    return b"#!" + interpreter.encode() + b"\n" + rest


def entry_point_names(site: Path) -> list[str]:
    """Names of the console and gui scripts declared by the distributions installed in ``site``
    (their ``*.dist-info/entry_points.txt``), sorted; names that are not a plain file name are
    left out."""
    names: set[str] = set()
    for path in sorted(site.glob("*.dist-info/entry_points.txt")):
        parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the names' case
        try:
            parser.read_string(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            logger.warning("unreadable %s (%s): its scripts are not installed", path.name, exc)
            continue
        for section in _SECTIONS:
            if parser.has_section(section):
                names.update(name.strip() for name in parser.options(section))
    return sorted(name for name in names if _plain(name))


def _plain(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and "/" not in name and "\0" not in name


def install_console_scripts(site: Path, tree: Path, interpreter: str) -> list[str]:
    """Move the launchers pip wrote in ``site/bin`` for the installed entry points into
    ``tree/usr/local/bin``, retargeted at ``interpreter`` (mode 0755); drop ``site/bin``.
    Returns the names installed."""
    source = site / "bin"
    installed: list[str] = []
    if source.is_symlink() or not source.is_dir():
        _drop(source)
        return installed
    target = tree / GUEST_SCRIPT_DIR
    for name in entry_point_names(site):
        path = source / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_SCRIPT:
            logger.warning("console script %s is not a regular launcher: not installed", name)
            continue
        script = retarget_shebang(path.read_bytes(), interpreter)
        if script is None:
            logger.warning("console script %s has no Python shebang: not installed", name)
            continue
        target.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
        with os.fdopen(fd, "wb") as out:
            out.write(script)
        os.chmod(target / name, 0o755, follow_symlinks=False)
        installed.append(name)
    _drop(source)
    return installed


def _drop(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
