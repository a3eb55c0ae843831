"""Shared fixtures for tests that boot real sandbox VMs (QEMU under TCG).

- ``sbx_settings`` (session): :class:`Settings` from the environment with TCG forced; the image
  cache is the normal user cache, so images built once (``sbx images build``) are reused.
- ``sbx_images`` (session): a :class:`VmManager`; ``sbx_images.get_bundle(language)`` builds on
  first use (the first run of the suite pays the image build).
- ``sbx_leaks`` (function): a :class:`LeakChecker` owning a short runtime dir; after the test it
  asserts that no qemu-system / qemu-storage-daemon child process, no socket, overlay or VM
  directory in the runtime dir, and no guest RAM file in /dev/shm of this test's VMs remain.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from exec_sandbox.settings import Settings
from exec_sandbox.vm_manager import ImageBundle, VmManager
from smartvm.qemu import QemuMachine

__all__ = ["LeakChecker", "child_processes"]

_WATCHED_COMMANDS = ("qemu-system", "qemu-storage-d", "qemu-img")


def child_processes(parent: int | None = None) -> list[tuple[int, str]]:
    """(pid, comm) of the live direct children of ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        fields = raw[raw.rindex(b")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state not in (b"Z", b"X"):
            found.append((int(entry), comm))
    return found


class LeakChecker:
    """Hands out VM ids and a runtime dir; :meth:`assert_clean` proves nothing was left behind."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.prefix = "t" + secrets.token_hex(3)
        self._count = 0
        self.extra_dirs: list[Path] = []

    def new_id(self) -> str:
        self._count += 1
        return f"{self.prefix}-{self._count}"

    def watch_dir(self, path: Path) -> Path:
        """Also require ``path`` (e.g. an overlay pool dir) to be empty or gone at the end."""
        self.extra_dirs.append(path)
        return path

    def qemu_children(self) -> list[tuple[int, str]]:
        return [(pid, comm) for pid, comm in child_processes() if comm.startswith(_WATCHED_COMMANDS)]

    def leftovers(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        procs = self.qemu_children()
        if procs:
            found["processes"] = [f"{pid} {comm}" for pid, comm in procs]
        for directory in [self.runtime_dir, *self.extra_dirs]:
            if directory.exists():
                entries = sorted(str(p) for p in directory.rglob("*"))
                if entries:
                    found[str(directory)] = entries
        # RAM files live in /dev/shm/smartvm-<uid>/ (or a fallback dir beside it): look everywhere.
        shm = sorted(str(p) for p in Path("/dev/shm").glob(f"**/*{self.prefix}*"))
        if shm:
            found["/dev/shm"] = shm
        return found

    async def assert_clean(self, settle_s: float = 2.0) -> None:
        # Undo runs before the caller regains control; the short settle only covers the kernel
        # finishing the reaping of a process that was already waited for.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while (found := self.leftovers()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert not found, f"leftovers after the test: {found}"


@pytest.fixture(scope="session")
def sbx_settings() -> Settings:
    return Settings(force_emulation=True)


@pytest.fixture(scope="session")
def sbx_images(sbx_settings: Settings) -> VmManager:
    return VmManager(sbx_settings)


@pytest.fixture
def sbx_runtime_dir() -> Iterator[Path]:
    # Short on purpose: QEMU's unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def sbx_leaks(sbx_runtime_dir: Path) -> AsyncIterator[LeakChecker]:
    checker = LeakChecker(sbx_runtime_dir)
    before = checker.qemu_children()
    assert not before, f"qemu children alive before the test: {before}"
    yield checker
    await checker.assert_clean()


@pytest.fixture(scope="session")
def python_bundle(sbx_images: VmManager) -> ImageBundle:
    """The real python image bundle (built on first use)."""
    return sbx_images.get_bundle("python")


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A QEMU runtime dir; short on purpose: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="svq-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def machines() -> AsyncIterator[list[QemuMachine]]:
    """Append every QemuMachine a test starts; they are stopped (newest first) afterwards."""
    made: list[QemuMachine] = []
    yield made
    for machine in reversed(made):
        await machine.stop(timeout=2)
