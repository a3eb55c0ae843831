"""The L2 layer cache on real files, with a build function standing in for the builder VM."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from exec_sandbox.packages import LayerCache, LayerKeyInputs, LockedPackage, PackageLock

_SHA = "c" * 64
LOCK = PackageLock(
    ecosystem="pip", target="t", packages=(LockedPackage(name="six", version="1", sha256=_SHA),)
)


def inputs(n: int = 0) -> LayerKeyInputs:
    return LayerKeyInputs(
        language="python", base_rootfs_sha256=_SHA, base_recipe_hash="r", target="t", lock_digest=f"d{n}"
    )


class Builder:
    """Writes ``size`` bytes as the layer; counts its calls and can fail or wait."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, tmp: Path) -> Path:
        self.calls += 1
        assert os.stat(tmp).st_mode & 0o777 == 0o700
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("builder VM failed")
        layer = tmp / "layer.qcow2"
        fd = os.open(layer, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, os.urandom(self.size))
        os.close(fd)
        return layer


async def test_build_once_then_hit_with_private_files(tmp_path: Path) -> None:
    cache, build = LayerCache(tmp_path / "layers"), Builder()
    entry, hit = await cache.get_or_build(inputs(), LOCK, build)
    assert not hit and build.calls == 1 and entry.lock == LOCK
    again, hit = await cache.get_or_build(inputs(), LOCK, build)
    assert hit and build.calls == 1 and again == entry
    # A second cache object (another process) verifies the stamp from scratch and hits too.
    other = LayerCache(tmp_path / "layers")
    third, hit = await other.get_or_build(inputs(), LOCK, build)
    assert hit and third.sha256 == entry.sha256
    assert (cache.cache_dir.stat().st_mode & 0o777) == 0o700
    for path in cache.cache_dir.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    stamp = json.loads((entry.path.parent / "layer.json").read_text())
    assert stamp["sha256"] == entry.sha256 and stamp["inputs"]["lock_digest"] == "d0"
    assert [p.name for p in cache.cache_dir.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "stamp", "missing"])
async def test_a_damaged_layer_is_discarded_and_rebuilt(tmp_path: Path, damage: str) -> None:
    cache, build = LayerCache(tmp_path / "layers"), Builder()
    entry, _ = await cache.get_or_build(inputs(), LOCK, build)
    if damage == "flip":
        data = bytearray(entry.path.read_bytes())
        data[100] ^= 1
        entry.path.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(entry.path, 10)
    elif damage == "stamp":
        (entry.path.parent / "layer.json").write_text("{not json")
    else:
        entry.path.unlink()
    rebuilt, hit = await cache.get_or_build(inputs(), LOCK, build)
    assert not hit and build.calls == 2 and cache.stats.corrupt_rebuilt == 1
    assert rebuilt.sha256 != entry.sha256 and rebuilt.path.exists()


async def test_concurrent_requests_build_once(tmp_path: Path) -> None:
    build = Builder()
    build.gate = asyncio.Event()
    a, b = LayerCache(tmp_path / "layers"), LayerCache(tmp_path / "layers")  # two "processes"
    first = asyncio.create_task(a.get_or_build(inputs(), LOCK, build))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(b.get_or_build(inputs(), LOCK, build))
    await asyncio.sleep(0.1)
    assert build.calls == 1 and not second.done()  # waits on the first builder's flock
    build.gate.set()
    (e1, hit1), (e2, hit2) = await asyncio.gather(first, second)
    assert (hit1, hit2) == (False, True) and e1.sha256 == e2.sha256 and build.calls == 1
    assert b.stats.waited_for_other_builder == 1


async def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache, build = LayerCache(tmp_path / "layers"), Builder()
    build.fail = True
    with pytest.raises(RuntimeError, match="builder VM failed"):
        await cache.get_or_build(inputs(), LOCK, build)
    assert cache.entries() == []
    assert [p.name for p in cache.cache_dir.iterdir()] == [".locks"]


async def test_lru_bound_by_entries_and_bytes(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "layers", max_entries=2, max_bytes=10_000)
    build = Builder(size=4000)
    keys = []
    for n in range(3):
        entry, _ = await cache.get_or_build(inputs(n), LOCK, build)
        keys.append(entry.key)
        os.utime(cache.entry_dir(entry.key), (1000 + n, 1000 + n))  # deterministic use order
    assert cache.entries() == sorted(keys[1:]) and cache.stats.pruned == 1
    await cache.get_or_build(inputs(1), LOCK, build)  # a hit makes it the most recent
    big = Builder(size=7000)
    entry, _ = await cache.get_or_build(inputs(9), LOCK, big)
    # 7000 + 4000 > 10000 bytes: only the newest survives beside... nothing else fits.
    assert cache.entries() == [entry.key]


def test_bad_bounds() -> None:
    with pytest.raises(ValueError):
        LayerCache(Path("/tmp/x"), max_entries=0)
