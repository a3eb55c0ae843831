"""Pure parts of overlay creation: argv/QMP builders, image-info parsing, state guards (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exec_sandbox.errors import QemuStorageDaemonError, SandboxInputError
from exec_sandbox.storage.daemon import DaemonState, QemuStorageDaemon, build_daemon_argv
from exec_sandbox.storage.overlay_pool import OverlayPool, PoolState, default_pool_size
from exec_sandbox.storage.qcow2 import (
    ImageInfo,
    build_file_create_options,
    build_qcow2_create_options,
    build_qemu_img_create_argv,
    build_qemu_img_info_argv,
    ensure_qcow2,
    escape_qemu_option_value,
    overlay_size,
    parse_image_info,
)

QEMU_IMG_INFO_QCOW2 = """{
    "backing-filename-format": "qcow2",
    "virtual-size": 67108864,
    "filename": "/tmp/o.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "full-backing-filename": "/tmp/base.qcow2",
    "backing-filename": "/tmp/base.qcow2",
    "dirty-flag": false
}"""


class TestBuilders:
    def test_escape_doubles_commas_only(self) -> None:
        assert escape_qemu_option_value("/a,b,,c=d") == "/a,,b,,,,c=d"

    def test_daemon_argv_serves_qmp_on_the_inherited_fd_and_the_socket(self) -> None:
        argv = build_daemon_argv("qsd", Path("/run/x,y/qmp.sock"), 7)
        assert argv == [
            "qsd",
            "--chardev",
            "socket,id=qmp0,fd=7",
            "--monitor",
            "chardev=qmp0",
            "--chardev",
            "socket,id=qmp1,path=/run/x,,y/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=qmp1",
        ]

    def test_info_argv_pins_file_driver_so_odd_names_are_literal(self) -> None:
        argv = build_qemu_img_info_argv("qemu-img", Path("/img/a:b,c.qcow2"))
        assert argv[:4] == ["qemu-img", "info", "-U", "--output=json"]
        assert argv[4].startswith("json:")
        spec = json.loads(argv[4].removeprefix("json:"))
        assert spec == {"file": {"driver": "file", "filename": "/img/a:b,c.qcow2"}}

    def test_create_argv_names_both_formats(self) -> None:
        argv = build_qemu_img_create_argv("qemu-img", Path("/b.qcow2"), Path("/o.qcow2"), 1024)
        assert argv == [
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "/b.qcow2", "/o.qcow2", "1024",
        ]  # fmt: skip

    def test_file_create_options(self) -> None:
        assert build_file_create_options(Path("/x/o.qcow2")) == {
            "driver": "file",
            "filename": "/x/o.qcow2",
            "size": 0,
        }

    def test_qcow2_create_options_carry_backing_path_verbatim(self) -> None:
        opts = build_qcow2_create_options("node1", 4096, Path("/images/link to base.qcow2"))
        assert opts == {
            "driver": "qcow2",
            "file": "node1",
            "size": 4096,
            "backing-file": "/images/link to base.qcow2",
            "backing-fmt": "qcow2",
        }


class TestImageInfo:
    def test_parse_qemu_img_output(self) -> None:
        info = parse_image_info(QEMU_IMG_INFO_QCOW2)
        assert info == ImageInfo(format="qcow2", virtual_size=67108864, backing_filename="/tmp/base.qcow2")

    def test_parse_rejects_non_info_output(self) -> None:
        with pytest.raises(ValueError, match="unexpected qemu-img info output"):
            parse_image_info('{"filename": "x"}')
        with pytest.raises(ValueError, match="unexpected qemu-img info output"):
            parse_image_info("qemu-img: error")

    def test_ensure_qcow2_names_the_detected_format(self) -> None:
        ensure_qcow2(Path("/b"), ImageInfo(format="qcow2", virtual_size=1))
        with pytest.raises(QemuStorageDaemonError, match=r"/b is not qcow2 format \(detected 'raw'\)") as err:
            ensure_qcow2(Path("/b"), ImageInfo(format="raw", virtual_size=1))
        assert err.value.context["format"] == "raw"

    def test_overlay_size_defaults_to_base_and_refuses_shrinking(self) -> None:
        info = ImageInfo(format="qcow2", virtual_size=1000)
        assert overlay_size(Path("/b"), info, None) == 1000
        assert overlay_size(Path("/b"), info, 5000) == 5000
        with pytest.raises(SandboxInputError, match="smaller than the virtual size 1000"):
            overlay_size(Path("/b"), info, 999)


class TestDaemonGuards:
    async def test_create_overlay_before_start_names_the_state(self) -> None:
        daemon = QemuStorageDaemon()
        with pytest.raises(QemuStorageDaemonError, match=r"not started \(state: new\)"):
            await daemon.create_overlay(Path("/fake/base.qcow2"), Path("/fake/out.qcow2"))

    async def test_stop_before_start_is_a_noop(self) -> None:
        daemon = QemuStorageDaemon()
        await daemon.stop()
        await daemon.stop()
        assert daemon.state is DaemonState.STOPPED
        assert daemon.started is False
        assert daemon.pid is None
        assert daemon.socket_path is None


class TestPoolGuards:
    def test_default_pool_size_follows_concurrency_with_a_cap(self) -> None:
        assert default_pool_size(1) == 1
        assert default_pool_size(5) == 5
        assert default_pool_size(10_000) == 32

    def test_bad_sizes_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(SandboxInputError, match="max_concurrent_vms must be >= 1"):
            OverlayPool(max_concurrent_vms=0, pool_dir=tmp_path)
        with pytest.raises(SandboxInputError, match="pool_size_per_base must be >= 0"):
            OverlayPool(max_concurrent_vms=1, pool_dir=tmp_path, pool_size_per_base=-1)

    def test_pool_size_derived_unless_given(self, tmp_path: Path) -> None:
        assert OverlayPool(max_concurrent_vms=5, pool_dir=tmp_path).pool_size_per_base == 5
        assert (
            OverlayPool(max_concurrent_vms=5, pool_dir=tmp_path, pool_size_per_base=2).pool_size_per_base == 2
        )

    async def test_acquire_before_start_names_the_state(self, tmp_path: Path) -> None:
        pool = OverlayPool(max_concurrent_vms=1, pool_dir=tmp_path / "pool")
        with pytest.raises(SandboxInputError, match=r"not running \(state: new\)"):
            await pool.acquire(tmp_path / "base.qcow2", tmp_path / "o.qcow2")

    async def test_stop_before_start_is_safe_and_creates_nothing(self, tmp_path: Path) -> None:
        pool = OverlayPool(max_concurrent_vms=1, pool_dir=tmp_path / "pool")
        await pool.stop()
        await pool.stop()
        assert pool.state is PoolState.STOPPED
        assert pool.daemon_enabled is False
        assert pool._daemon is None
        assert not (tmp_path / "pool").exists()
