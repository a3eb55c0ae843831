"""The second local user: fixtures for attacks made as another unprivileged uid on the same host.

Every test here is written as the attack. The attacker is ``nobody`` (uid/gid 65534, no groups):
``setpriv --reuid --regid --clear-groups`` runs a command as that user (the system ``python3``, so
the attacker uses nothing of this project). The library runs as the test's own uid (root here).

- ``attacker``: an :class:`Attacker` (``run`` a command, ``python`` a snippet, ``probe`` paths).
- ``shared_sticky_dir``: a ``1777`` directory like ``/tmp`` (anyone may create entries in it).
- ``shared_open_dir``: a ``0777`` directory without the sticky bit (a shared project directory):
  there the kernel's ``protected_symlinks`` never applies, so planted symlinks are followed by
  whoever opens through them, whatever the host's sysctls.
- ``victim_file``: a file of ours (root, 0644) in a private directory, that nothing may touch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ATTACKER_UID = 65534
_PYTHON = "/usr/bin/python3"

# Run as the attacker: for each path, try to read it (list a directory, open a file).
_PROBE = """
import json, os, sys
out = {}
for p in json.load(sys.stdin):
    try:
        if os.path.isdir(p):
            os.listdir(p)
        else:
            os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
        out[p] = "readable"
    except PermissionError:
        out[p] = "denied"
    except OSError as exc:
        out[p] = f"errno {exc.errno}"
print(json.dumps(out))
"""


class Attacker:
    """Runs commands as another local user (``nobody``)."""

    uid = ATTACKER_UID

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        return proc

    def python(self, code: str, *args: str, stdin: str | None = None) -> str:
        proc = self.run([_PYTHON, "-c", code, *args], stdin=stdin)
        assert proc.returncode == 0, f"attacker's script failed: {proc.stderr}"
        return proc.stdout

    def probe(self, paths: Sequence[Path]) -> dict[str, str]:
        """For each path: "denied" (PermissionError), "readable", or "errno N" when read as the attacker."""
        return dict(json.loads(self.python(_PROBE, stdin=json.dumps([str(p) for p in paths]))))

    def tree(self, root: Path) -> list[str]:
        """Everything under ``root`` as the attacker sees it (their own directory)."""
        code = (
            "import os, sys\n"
            "for d, dirs, files in os.walk(sys.argv[1]):\n"
            "    [print(os.path.join(d, n)) for n in dirs + files]"
        )
        return sorted(self.python(code, str(root)).split())


@pytest.fixture(scope="session")
def attacker() -> Attacker:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("the second-user attacks need root (to switch to another uid) and setpriv")
    return Attacker()


def _shared(mode: int) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sbxsec-", dir="/tmp"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared_sticky_dir() -> Iterator[Path]:
    yield from _shared(0o1777)


@pytest.fixture
def shared_open_dir() -> Iterator[Path]:
    yield from _shared(0o777)


@pytest.fixture
def victim_file() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="sbxvictim-", dir="/tmp"))
    victim = home / "precious.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    try:
        yield victim
    finally:
        shutil.rmtree(home, ignore_errors=True)
