"""The `smartvm` CLI end to end: a real supervisor process driving the fake Firecracker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fake_firecracker.harness import make_target, pid_alive, short_tmp_dir

pytestmark = pytest.mark.integration


def smartvm(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", "--data-dir", str(data_dir), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def out(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


@pytest.fixture
def workdir() -> Any:
    with short_tmp_dir() as d:
        yield d


def write_config(workdir: Path, vm_id: str = "cli-vm") -> tuple[Path, Path]:
    target = make_target("fake", workdir)
    cfg = workdir / "vm.json"
    cfg.write_text(json.dumps(target.config(vm_id)))
    return cfg, target.binary


def test_full_lifecycle_through_the_cli(workdir: Path) -> None:
    data = workdir / "data"
    cfg, binary = write_config(workdir)
    created = out(smartvm(data, "create", str(cfg), "--firecracker-bin", str(binary)))
    assert created["id"] == "cli-vm" and created["state"] == "created"
    started = out(smartvm(data, "start", "cli-vm"))
    assert started["state"] == "running"
    sup_pid, vmm_pid = started["supervisor_pid"], started["vmm_pid"]
    assert pid_alive(sup_pid) and pid_alive(vmm_pid)
    try:
        info = out(smartvm(data, "info", "cli-vm"))
        assert info["vmm"] == "firecracker" and info["vmm_state"] == "Running"
        assert out(smartvm(data, "pause", "cli-vm"))["state"] == "paused"
        assert out(smartvm(data, "info", "cli-vm"))["vmm_state"] == "Paused"
        snap = out(
            smartvm(
                data,
                "snapshot",
                "cli-vm",
                "--snapshot",
                str(workdir / "s.snap"),
                "--mem",
                str(workdir / "s.mem"),
            )
        )
        assert Path(snap["snapshot_path"]).exists() and Path(snap["mem_file_path"]).exists()
        assert out(smartvm(data, "resume", "cli-vm"))["state"] == "running"
        listed = out(smartvm(data, "list"))
        assert listed == [{"id": "cli-vm", "vmm": "firecracker", "state": "running", "pid": vmm_pid}]
    finally:
        stopped = out(smartvm(data, "stop", "cli-vm"))
    assert stopped["state"] == "stopped"
    deadline = time.monotonic() + 10
    while (pid_alive(sup_pid) or pid_alive(vmm_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(sup_pid) and not pid_alive(vmm_pid)
    assert not (data / "sockets" / "cli-vm.sock").exists()
    assert not (data / "cli" / "cli-vm" / "control.sock").exists()
    # stop is idempotent; rm forgets the record
    assert out(smartvm(data, "stop", "cli-vm"))["state"] == "stopped"
    assert out(smartvm(data, "rm", "cli-vm")) == {"removed": "cli-vm"}
    assert out(smartvm(data, "list")) == []


def test_snapshot_of_running_vm_is_refused(workdir: Path) -> None:
    data = workdir / "data"
    cfg, binary = write_config(workdir, "snapvm")
    smartvm(data, "create", str(cfg), "--firecracker-bin", str(binary))
    smartvm(data, "start", "snapvm")
    try:
        proc = smartvm(data, "snapshot", "snapvm", "--snapshot", "x", "--mem", "y", check=False)
        assert proc.returncode == 1
        assert out(proc)["error"]["code"] == "INVALID_STATE"
    finally:
        smartvm(data, "stop", "snapvm")


def test_invalid_config_is_rejected_with_every_problem(workdir: Path) -> None:
    cfg = workdir / "bad.json"
    cfg.write_text(
        json.dumps(
            {
                "machine_config": {"vcpu_count": 64, "mem_size_mib": 128},
                "vsock": {"guest_cid": 2, "uds_path": "/tmp/v.sock"},
            }
        )
    )
    proc = smartvm(workdir / "data", "create", str(cfg), check=False)
    assert proc.returncode == 1
    err = out(proc)["error"]
    assert err["code"] == "INVALID_CONFIG"
    problems = json.loads(json.dumps(err["details"]["errors"]))
    assert "vsock.guest_cid must be >= 3" in problems
    assert not (workdir / "data" / "cli").exists()


@pytest.mark.parametrize(
    "args, code",
    [
        (["start", "nope"], "VM_NOT_FOUND"),
        (["pause", "nope"], "VM_NOT_FOUND"),
        (["info", "nope"], "VM_NOT_FOUND"),
    ],
)
def test_unknown_vm_is_a_clear_error(workdir: Path, args: list[str], code: str) -> None:
    proc = smartvm(workdir / "data", *args, check=False)
    assert proc.returncode == 1
    assert out(proc)["error"]["code"] == code


def test_missing_config_file(workdir: Path) -> None:
    proc = smartvm(workdir / "data", "validate", str(workdir / "absent.toml"), check=False)
    assert proc.returncode == 1
    assert out(proc)["error"]["code"] == "INVALID_CONFIG"


def test_toml_config_validates(workdir: Path) -> None:
    cfg = workdir / "vm.toml"
    cfg.write_text(
        '[boot_source]\nkernel_image_path = "/vmlinux"\n'
        "[machine_config]\nvcpu_count = 1\nmem_size_mib = 128\n"
    )
    assert out(smartvm(workdir / "data", "validate", str(cfg))) == {"valid": True, "errors": []}


def test_start_failure_reports_and_leaves_nothing(workdir: Path) -> None:
    data = workdir / "data"
    cfg, _ = write_config(workdir, "failvm")
    smartvm(data, "create", str(cfg), "--firecracker-bin", "/nonexistent/firecracker")
    proc = smartvm(data, "start", "failvm", "--timeout", "60", check=False)
    assert proc.returncode == 1
    assert out(proc)["error"]["code"] == "VMM_START_FAILED"
    record = json.loads((data / "cli" / "failvm" / "record.json").read_text())
    assert record["state"] == "error" and record["supervisor_pid"] is None
    assert not (data / "sockets" / "failvm.sock").exists()
    assert os.listdir(data / "cli" / "failvm") == ["record.json", "supervisor.log"] or set(
        os.listdir(data / "cli" / "failvm")
    ) == {"record.json", "supervisor.log"}
