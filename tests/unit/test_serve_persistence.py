"""The state dir of ``sbx serve`` (no VMs): entries appear only complete, private, one server per dir,
and what a killed server left half-written or unreadable is removed, never loaded."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.server.persistence import SavedContext, SavedSandbox, StateStore


def _saved(entry_id: str) -> SavedSandbox:
    now = time.time()
    return SavedSandbox(
        id=entry_id,
        owner="ab" * 32,
        template_id="base",
        metadata={"k": "v"},
        memory_mb=256,
        started_at=now,
        end_at=now + 60,
        saved_at=now,
        contexts=[SavedContext(id="c0ffee01", language="python", cwd="/home/user", snapshot=True)],
    )


def test_commit_load_discard_round_trip_with_private_modes(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.open()
    try:
        staging = store.staging("sandboxes", "iabc123")
        (staging / "main").mkdir(mode=0o700)
        assert store.load("sandboxes") == []  # a staging dir is not an entry
        entry = store.commit("sandboxes", staging, _saved("iabc123"))
        assert entry == store.path("sandboxes", "iabc123") and not staging.exists()
        assert [s.id for s in store.load("sandboxes")] == ["iabc123"]
        assert store.load("sandboxes")[0].contexts[0].language == "python"
        for p in [store.root, *store.root.rglob("*")]:
            if p.name != ".lock":
                assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
        store.discard(entry)
        assert store.load("sandboxes") == [] and not entry.exists()
        with pytest.raises(ValueError):
            store.path("sandboxes", "../escape")
        with pytest.raises(ValueError):
            store.discard(tmp_path)
    finally:
        store.close()


def test_one_server_per_state_dir(tmp_path: Path) -> None:
    first, second = StateStore(tmp_path), StateStore(tmp_path)
    first.open()
    try:
        with pytest.raises(SandboxPermanentError) as refused:
            second.open()
        assert refused.value.context["field"] == "state_dir"
    finally:
        first.close()
    second.open()  # free again once the first server is gone
    second.close()


def test_leftovers_of_a_killed_server_are_removed_not_loaded(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.open()
    half = store.staging("templates", "snap-1234")
    (half / "memory").write_bytes(b"guest memory")
    good = store.commit("sandboxes", store.staging("sandboxes", "igood1"), _saved("igood1"))
    bad = store.path("sandboxes", "ibad11")
    bad.mkdir(mode=0o700)
    (bad / "record.json").write_text('{"id": "ibad11"}')  # incomplete record
    wrong = store.path("sandboxes", "iwrong")
    wrong.mkdir(mode=0o700)
    (wrong / "record.json").write_text(_saved("iother").model_dump_json())  # record of another id
    store.close()

    again = StateStore(tmp_path)
    again.open()
    try:
        assert not half.exists()
        assert [s.id for s in again.load("sandboxes")] == ["igood1"]
        assert good.exists() and not bad.exists() and not wrong.exists()
    finally:
        again.close()


def test_an_unsafe_state_dir_is_refused_with_the_field_named(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # others may write here: the state dir below it is not private
    with pytest.raises(SandboxPermanentError) as refused:
        StateStore(shared / "state").open()
    assert refused.value.context["field"] == "state_dir"
