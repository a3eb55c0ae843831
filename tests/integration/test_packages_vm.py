"""``packages=`` end to end in real VMs (QEMU under TCG), against an index and a registry the test
serves on 127.0.0.1: the L2 layer is built once and hit after, with an L1 snapshot of its own; a
changed lock misses; a corrupted layer is detected and rebuilt; bad requests fail before any VM.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from exec_sandbox import Scheduler
from exec_sandbox.errors import PackageResolutionError, SandboxInputError
from exec_sandbox.packages import PackageLock
from tests.integration.conftest import child_processes
from tests.integration.package_index import LocalIndex, package_scheduler, serve_index

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

_CODE = "import sbxdemo, sbxdep; print(sbxdemo.__version__, sbxdep.__version__)"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIndex]:
    with serve_index(LocalIndex(tmp_path_factory.mktemp("index"))) as idx, pytest.MonkeyPatch.context() as mp:
        idx.add_wheel("sbxdep", "0.3")
        idx.add_wheel("sbxdemo", "1.0")
        idx.add_wheel("sbxdemo", "2.0", requires=("sbxdep>=0.2",))
        idx.add_wheel("sbxwin", "1.0", tag="cp311-cp311-win_amd64")
        idx.add_wheel("sbxpins", "1.0", requires=("sbxdep<0.2",))
        idx.add_wheel(
            "sbxtool", "1.0", console_scripts={"sbxtool": "sbxtool:main"},
            code="import sys\ndef main():\n    print('sbxtool', sys.executable, *sys.argv[1:])\n",
        )
        idx.add_npm("sbxleft", "1.2.0", main="module.exports = (s, n) => String(s).padStart(n, '*');")
        idx.add_npm(
            "sbxpad", "2.0.1", main="module.exports = require('sbxleft');", dependencies={"sbxleft": "^1"}
        )
        for key, value in idx.env().items():
            mp.setenv(key, value)
        yield idx


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler(index: LocalIndex, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scheduler]:
    async with package_scheduler(tmp_path_factory.mktemp("caches")) as s:
        yield s


async def test_second_run_boots_from_the_cached_layer_and_its_own_snapshot(scheduler: Scheduler) -> None:
    first = await scheduler.run(_CODE, packages=["sbxdemo"])
    assert (first.exit_code, first.stdout) == (0, "2.0 0.3\n"), first.stderr
    assert first.packages is not None and first.packages.versions() == {"sbxdemo": "2.0", "sbxdep": "0.3"}
    assert first.packages_cache_hit is False and scheduler.packages.cache.stats.builds == 1
    snapshots = scheduler.snapshot_cache
    assert snapshots is not None
    await snapshots.wait_saved()
    plain = await scheduler.run("import importlib.util as u; print(u.find_spec('sbxdemo'))")
    assert plain.stdout == "None\n"  # the base image never got the packages
    second = await scheduler.run(_CODE, packages=["sbxdemo"])
    assert (second.exit_code, second.stdout) == (0, "2.0 0.3\n")
    assert second.packages_cache_hit is True and second.restored_from_snapshot is True
    assert second.packages == first.packages
    assert scheduler.packages.cache.stats.builds == 1
    # The layer's own L1 entry: a different key from the bare image's.
    await snapshots.wait_saved()
    assert len(snapshots.entries()) == 2
    layer_dir = scheduler.packages.cache.cache_dir
    assert layer_dir.stat().st_mode & 0o777 == 0o700
    for entry in scheduler.packages.cache.entries():
        for f in (layer_dir / entry).iterdir():
            assert f.stat().st_mode & 0o777 == 0o600, f


async def test_a_lock_reproduces_the_install_without_asking_the_index(
    scheduler: Scheduler, index: LocalIndex
) -> None:
    first = await scheduler.run(_CODE, packages=["sbxdemo"])
    assert first.packages is not None
    index.hits.clear()
    again = await scheduler.run(_CODE, packages=first.packages)
    assert again.stdout == "2.0 0.3\n" and again.packages_cache_hit is True
    assert index.hits == []
    pinned = await scheduler.run(_CODE, packages=first.packages.pins())  # the same lock as strings
    assert pinned.packages_cache_hit is True and pinned.packages is not None
    assert pinned.packages.digest() == first.packages.digest()


async def test_a_changed_lock_misses(scheduler: Scheduler) -> None:
    builds = scheduler.packages.cache.stats.builds
    old = await scheduler.run("import sbxdemo; print(sbxdemo.__version__)", packages=["sbxdemo==1.0"])
    assert old.stdout == "1.0\n" and old.packages_cache_hit is False
    assert old.packages is not None and old.packages.versions() == {"sbxdemo": "1.0"}
    assert scheduler.packages.cache.stats.builds == builds + 1


async def test_a_corrupted_layer_is_detected_and_rebuilt(scheduler: Scheduler) -> None:
    first = await scheduler.run(_CODE, packages=["sbxdemo"])
    cache = scheduler.packages.cache
    key = next(k for k in cache.entries() if _holds(cache, k, "sbxdemo", "2.0"))
    layer = cache.entry_dir(key) / "layer.qcow2"
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte somewhere in the packages' clusters
    layer.write_bytes(bytes(data))
    corrupt = cache.stats.corrupt_rebuilt
    again = await scheduler.run(_CODE, packages=["sbxdemo"])
    assert cache.stats.corrupt_rebuilt == corrupt + 1
    assert again.packages_cache_hit is False and again.stdout == "2.0 0.3\n"
    assert again.packages == first.packages


def _holds(cache: object, key: str, name: str, version: str) -> bool:
    import json

    stamp = json.loads((cache.entry_dir(key) / "layer.json").read_text())  # type: ignore[attr-defined]
    return PackageLock.model_validate(stamp["lock"]).versions().get(name) == version


@pytest.mark.parametrize(
    ("packages", "package", "error"),
    [
        (["sbx-no-such-package"], "sbx-no-such-package", PackageResolutionError),
        (["sbxdemo==7.0"], "sbxdemo==7.0", PackageResolutionError),
        (["sbxwin"], "sbxwin", PackageResolutionError),
        (["sbxdemo==2.0", "sbxpins"], "sbxdemo==2.0 and sbxpins==1.0", PackageResolutionError),
        (["--index-url=http://127.0.0.1:1/"], "--index-url=http://127.0.0.1:1/", SandboxInputError),
        (["sbxdemo @ http://127.0.0.1:1/x.whl"], "sbxdemo @ http://127.0.0.1:1/x.whl", SandboxInputError),
    ],
)
async def test_bad_requests_fail_before_any_vm(
    scheduler: Scheduler, packages: list[str], package: str, error: type[Exception]
) -> None:
    snapshots = scheduler.snapshot_cache
    assert snapshots is not None
    before = (snapshots.stats.cold_boots, snapshots.stats.restores, scheduler.packages.cache.stats.builds)
    with pytest.raises(error) as info:
        await scheduler.run("print(1)", packages=packages)
    assert isinstance(info.value, SandboxInputError)
    assert info.value.context["field"] == "packages" and info.value.context["package"] == package
    after = (snapshots.stats.cold_boots, snapshots.stats.restores, scheduler.packages.cache.stats.builds)
    assert after == before
    assert not [c for c in child_processes() if c[1].startswith("qemu-system")]  # no VM ran


async def test_session_packages_and_its_fork(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python", packages=["sbxdemo==1.0"]) as s:
        assert s.packages is not None and s.packages.versions() == {"sbxdemo": "1.0"}
        await s.exec("import sbxdemo")
        assert (await s.exec("print(sbxdemo.__version__)")).stdout == "1.0\n"
        async with await s.fork() as child:
            assert child.packages == s.packages
            assert (await child.exec("print(sbxdemo.__version__)")).stdout == "1.0\n"


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed on this host")
async def test_javascript_session_gets_node_modules(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="javascript", packages=["sbxpad@2"]) as s:
        assert s.packages is not None and s.packages.versions() == {"sbxpad": "2.0.1", "sbxleft": "1.2.0"}
        out = await s.exec("const pad = require('sbxpad'); console.log(pad('x', 3))")
        assert out.stdout == "**x\n", out.stderr
        listing = await s.exec("console.log(require('fs').readdirSync('node_modules').sort().join(','))")
        assert "sbxleft,sbxpad" in listing.stdout
    one_shot = await scheduler.run(
        "console.log(require('sbxpad')(7, 2))", language="javascript", packages=["sbxpad@2"]
    )
    assert one_shot.stdout == "*7\n" and one_shot.packages_cache_hit is True


async def test_console_scripts_run_by_name_on_the_guest_path(scheduler: Scheduler) -> None:
    code = (
        "import shutil, subprocess\n"
        "print(shutil.which('sbxtool'))\n"
        "print(open(shutil.which('sbxtool')).readline().strip())\n"
        "out = subprocess.run(['sbxtool', 'a', 'b'], capture_output=True, text=True, check=True)\n"
        "print(out.stdout, end='')\n"
    )
    result = await scheduler.run(code, packages=["sbxtool"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "/usr/local/bin/sbxtool", "#!/usr/bin/python3", "sbxtool /usr/bin/python3 a b"
    ], result.stdout + result.stderr


async def test_packages_are_files_only_the_guest_has_no_network(scheduler: Scheduler) -> None:
    code = (
        "import socket, sbxdemo\n"
        "s = socket.socket()\ns.settimeout(2)\n"
        "try:\n    s.connect(('10.0.2.2', 80)); print('connected')\n"
        "except OSError as e:\n    print('no network', type(e).__name__)\n"
    )
    result = await scheduler.run(code, packages=["sbxdemo"])
    assert result.stdout.startswith("no network"), result.stdout + result.stderr


async def test_a_builder_vm_that_installs_nothing_fails_and_leaves_nothing(
    scheduler: Scheduler, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import asyncio
    import subprocess

    from exec_sandbox.errors import SandboxTransientError
    from exec_sandbox.packages import LayerCache, LayerKeyInputs
    from exec_sandbox.vm.layer_build import build_layer

    work = tmp_path_factory.mktemp("nomarker")
    (work / "root" / "tree").mkdir(parents=True)
    disk = work / "disk.ext4"
    mkfs = ["mkfs.ext4", "-q", "-F", "-d", str(work / "root"), str(disk), "8M"]
    await asyncio.to_thread(subprocess.run, mkfs, check=True)
    bundle = await scheduler.packages.vm_manager.aget_bundle("python")
    cache = LayerCache(work / "layers")
    inputs = LayerKeyInputs(language="python", base_rootfs_sha256="0" * 64, base_recipe_hash="r", target="t",
                            lock_digest="none")
    lock = PackageLock(ecosystem="pip", target="t", packages=())
    with pytest.raises(SandboxTransientError, match="without installing") as info:
        await cache.get_or_build(
            inputs, lock, lambda tmp: build_layer(bundle, disk, tmp, settings=scheduler.settings)
        )
    assert "console_tail" in info.value.context
    assert not [c for c in child_processes() if c[1].startswith("qemu-system")]
    assert cache.entries() == [] and [p.name for p in cache.cache_dir.iterdir()] == [".locks"]


async def test_cancelling_during_the_layer_build_leaves_no_vm_or_temp_dir(scheduler: Scheduler) -> None:
    import asyncio

    cache = scheduler.packages.cache
    task = asyncio.create_task(scheduler.run("print(1)", packages=["sbxdep==0.3"]))
    for _ in range(1200):  # the builder VM appears once the host resolved and staged the packages
        if [c for c in child_processes() if c[1].startswith("qemu-system")] or task.done():
            break
        await asyncio.sleep(0.05)
    assert not task.done(), "the run finished before its builder VM could be seen"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [c for c in child_processes() if c[1].startswith("qemu-system")]
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith(".tmp-")]
    again = await scheduler.run("import sbxdep; print(sbxdep.__version__)", packages=["sbxdep==0.3"])
    assert again.stdout == "0.3\n" and again.packages_cache_hit is False
