"""Forged owner records: the leftover reaper must not delete or kill anything that is not ours.

The reaper runs at every QEMU start (and when a Scheduler or storage daemon starts). It reads owner
records; the attacker writes them - in a runtime directory they pre-created, or (defence in depth)
we find a forged one in our own. Either way: no root-owned file outside our verified directories
is deleted, and no process that is not a VMM we started is killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.qemu.process import OwnerRecord, process_start_ticks, reap_leftovers, write_owner_record
from tests.security.conftest import Attacker


def _wait_dressed(pid: int) -> None:
    """Wait until ``pid`` has exec'd into its QEMU costume (argv[0] ``qemu-system-x86_64``)."""
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-system-x86_64\0"):
        assert time.monotonic() < deadline, "the dressed-up process never started"
        time.sleep(0.01)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def private_runtime_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sbxsec-rt-", dir="/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def fake_vmm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A root process that is NOT a VMM, dressed up as one: argv[0] ``qemu-system-x86_64`` and a
    QMP-socket-like path on its command line (what a weak check would accept)."""
    marker = "/tmp/sbxsec-planted/vm1/qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-c", "import time; time.sleep(120)", marker], executable=sys.executable
    )
    try:
        _wait_dressed(proc.pid)
        yield proc, marker
    finally:
        proc.kill()
        proc.wait()


def _forged_record(*, extra_files: list[str] = (), qemu_pid: int | None = None, marker: str = "") -> str:  # type: ignore[assignment]
    return json.dumps(
        {
            "vm_id": "vm1",
            "owner_pid": _dead_pid(),
            "owner_start": 1,
            "qemu_pid": qemu_pid,
            "qemu_start": process_start_ticks(qemu_pid) if qemu_pid else None,
            "marker": marker,
            "extra_files": list(extra_files),
        }
    )


_PLANT = """
import os, sys
root, record = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(root, "vm1"), mode=0o777)
os.chmod(root, 0o777)
with open(os.path.join(root, "vm1", "owner.json"), "w") as fh:
    fh.write(record)
"""


def test_forged_record_in_a_planted_runtime_dir_does_not_delete_a_root_file(
    attacker: Attacker, shared_sticky_dir: Path, victim_file: Path
) -> None:
    runtime = shared_sticky_dir / "rt"
    attacker.python(_PLANT, str(runtime), _forged_record(extra_files=[str(victim_file)]))
    reap_leftovers(runtime)  # what a QEMU start with this runtime dir runs first
    assert victim_file.read_text() == "precious\n"


def test_owner_record_cannot_make_the_reaper_delete_outside_its_dirs(
    private_runtime_dir: Path, victim_file: Path
) -> None:
    # Even a record in our own private runtime dir names files only inside our verified dirs.
    vm_dir = private_runtime_dir / "vm1"
    vm_dir.mkdir(mode=0o700)
    write_owner_record(vm_dir, OwnerRecord("vm1", _dead_pid(), 1, extra_files=[str(victim_file)]))
    reap_leftovers(private_runtime_dir)
    assert victim_file.read_text() == "precious\n"
    assert not vm_dir.exists()  # the dead owner's own directory is still cleaned up


def test_forged_record_in_a_planted_runtime_dir_does_not_get_a_process_killed(
    attacker: Attacker, shared_sticky_dir: Path, fake_vmm: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, marker = fake_vmm
    runtime = shared_sticky_dir / "rt"
    attacker.python(_PLANT, str(runtime), _forged_record(qemu_pid=proc.pid, marker=marker))
    assert reap_leftovers(runtime) == []
    assert proc.poll() is None, "a process named by a forged record was killed"


def test_owner_record_kills_only_a_proven_vmm_even_in_our_own_dir(
    private_runtime_dir: Path, fake_vmm: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, _ = fake_vmm
    vm_dir = private_runtime_dir / "vm1"
    vm_dir.mkdir(mode=0o700)
    marker = str(vm_dir / "qmp.sock")
    # Same pid and start time, argv[0] says qemu and the marker is on its command line: but its
    # executable is python, so it is not a VMM we started.
    dressed = subprocess.Popen(
        ["qemu-system-x86_64", "-c", "import time; time.sleep(120)", marker], executable=sys.executable
    )
    try:
        _wait_dressed(dressed.pid)
        record = OwnerRecord("vm1", _dead_pid(), 1, dressed.pid, process_start_ticks(dressed.pid), marker)
        write_owner_record(vm_dir, record)
        assert reap_leftovers(private_runtime_dir) == []
        assert dressed.poll() is None and proc.poll() is None
    finally:
        dressed.kill()
        dressed.wait()


def test_attackers_own_process_named_by_a_record_is_not_killed(
    attacker: Attacker, private_runtime_dir: Path
) -> None:
    # A process of the other user, dressed as QEMU, with our marker on its command line.
    vm_dir = private_runtime_dir / "vm1"
    vm_dir.mkdir(mode=0o700)
    marker = str(vm_dir / "qmp.sock")
    script = f"exec -a qemu-system-x86_64 /usr/bin/python3 -c 'import time; time.sleep(120)' {marker}"
    theirs = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={attacker.uid}",
            f"--regid={attacker.uid}",
            "--clear-groups",
            "--",
            "/bin/bash",
            "-c",
            script,
        ]
    )
    try:
        _wait_dressed(theirs.pid)  # setpriv and bash exec python in place: same pid
        record = OwnerRecord("vm1", _dead_pid(), 1, theirs.pid, process_start_ticks(theirs.pid), marker)
        write_owner_record(vm_dir, record)
        reap_leftovers(private_runtime_dir)
        assert theirs.poll() is None, "another user's process was killed"
    finally:
        theirs.kill()
        theirs.wait()
