"""The pure QEMU environment builder (glibc malloc tunables)."""

from __future__ import annotations

from smartvm.qemu.argv import QEMU_GLIBC_TUNABLES, build_env


def test_adds_tunables_and_keeps_the_rest() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    env = build_env(base)
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}
    assert QEMU_GLIBC_TUNABLES == "glibc.malloc.arena_max=1"
    assert base == {"PATH": "/usr/bin", "HOME": "/root"}  # the input is not modified


def test_operator_tunables_win_and_others_are_appended() -> None:
    env = build_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"
    env = build_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=0:glibc.malloc.arena_max=1"
    env = build_env({"GLIBC_TUNABLES": ""})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
