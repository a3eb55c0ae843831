"""A Scheduler starting on a given runtime dir reaps what dead owners left there, and nothing else.

The leftovers are those of a process killed outright with a networked sandbox: an ``egress-*``
directory holding its gateway's Unix sockets and an owner record (:mod:`smartvm.leftovers`). The
refusals are the attacks: another user's record, a live (or other live) owner, symlinks.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.host.runtime_dirs import make_scheduler_runtime_dir, reap_dead_owners
from smartvm.leftovers import (
    OWNER_FILE,
    OwnerRecord,
    make_owned_dir,
    process_start_ticks,
    write_owner_record,
)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_other() -> Iterator[int]:
    """A live process that is not us (another Scheduler's process, as far as records go)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _egress_dir(runtime: Path, name: str, record: OwnerRecord) -> Path:
    """What a gateway leaves: a private dir with listening sockets and its owner record."""
    path = runtime / name
    path.mkdir(mode=0o700)
    for sock_name in ("forward.sock", "dns.sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path / sock_name))
        sock.close()
    write_owner_record(path, record)
    return path


def _dead_record(name: str, *, uid: int | None = None) -> OwnerRecord:
    record = OwnerRecord(name, _dead_pid(), 1, kind="egress")
    if uid is not None:
        record.uid = uid
    return record


def test_a_dead_owners_egress_dir_is_reaped_at_scheduler_start(tmp_path: Path, live_other: int) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    dead = _egress_dir(runtime, "egress-dead0001", _dead_record("egress-dead0001"))
    # a pid that lives now but started at another time: the recorded owner is gone (pid reuse)
    reused = _egress_dir(
        runtime, "egress-reused01", OwnerRecord("egress-reused01", live_other, 1, kind="egress")
    )
    mine = make_owned_dir(runtime, "egress-", kind="egress")  # a live Scheduler of this process
    other = _egress_dir(
        runtime,
        "egress-other001",
        OwnerRecord("egress-other001", live_other, process_start_ticks(live_other), kind="egress"),
    )
    path, created = make_scheduler_runtime_dir(runtime)
    assert (path, created) == (runtime, False)
    assert not dead.exists() and not reused.exists()
    assert mine.is_dir() and (mine / OWNER_FILE).is_file()
    assert sorted(p.name for p in other.iterdir()) == ["dns.sock", "forward.sock", OWNER_FILE]
    assert reap_dead_owners(runtime) == []  # nothing dead is left


def test_the_reaper_refuses_other_owners_live_owners_and_symlinks(tmp_path: Path, live_other: int) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    # a record naming another user: not ours to act on, whatever it says
    theirs = _egress_dir(runtime, "egress-theirs01", _dead_record("egress-theirs01", uid=os.geteuid() + 1))
    # a record anyone could have written (group/other-writable): not trusted
    loose = _egress_dir(runtime, "egress-loose001", _dead_record("egress-loose001"))
    (loose / OWNER_FILE).chmod(0o666)
    # a live owner that is another process
    live = _egress_dir(
        runtime,
        "egress-live0001",
        OwnerRecord("egress-live0001", live_other, process_start_ticks(live_other), kind="egress"),
    )
    # a symlink named like an egress dir, to a dead owner's dir elsewhere: never followed
    elsewhere = _egress_dir(tmp_path, "elsewhere", _dead_record("elsewhere"))
    (runtime / "egress-link0001").symlink_to(elsewhere)
    # a real dir whose record is a symlink to a dead owner's record: not read, so not reaped
    linked_record = runtime / "egress-lrec0001"
    linked_record.mkdir(mode=0o700)
    (linked_record / OWNER_FILE).symlink_to(elsewhere / OWNER_FILE)
    before = sorted(p.name for p in runtime.iterdir())

    assert reap_dead_owners(runtime) == []
    assert sorted(p.name for p in runtime.iterdir()) == before
    for kept in (theirs, loose, live, elsewhere):
        assert (kept / "forward.sock").exists() and (kept / OWNER_FILE).is_file(), kept
    assert (runtime / "egress-link0001").is_symlink() and (linked_record / OWNER_FILE).is_symlink()


def test_a_symlinked_runtime_dir_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    dead = _egress_dir(target, "egress-dead0001", _dead_record("egress-dead0001"))
    link = tmp_path / "rt"
    link.symlink_to(target)
    with pytest.raises(SandboxPermanentError) as info:
        make_scheduler_runtime_dir(link)
    assert info.value.context["path"] == str(link)
    assert reap_dead_owners(link) == []
    assert (dead / "forward.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make an entry another user owns")
def test_an_entry_another_user_owns_is_never_reaped(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    nobody = 65534
    foreign = _egress_dir(runtime, "egress-foreign1", _dead_record("egress-foreign1"))
    os.chown(foreign, nobody, nobody)  # the dir is theirs (its record still looks like ours)
    record_owned_by_them = _egress_dir(runtime, "egress-foreign2", _dead_record("egress-foreign2"))
    os.chown(record_owned_by_them / OWNER_FILE, nobody, nobody)
    assert reap_dead_owners(runtime) == []
    assert (foreign / OWNER_FILE).is_file() and (record_owned_by_them / "dns.sock").exists()
