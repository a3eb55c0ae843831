"""Choose the QEMU accelerator: KVM only where it really works, else TCG.

``/dev/kvm`` existing is not enough: on hosts whose KVM module is the
paravirtual ``kvm_pvm`` an ordinary guest kernel hangs although every ioctl
succeeds. The rule below is boot-free and cheap (three file checks):

* ``/dev/kvm`` is readable and writable by us, AND
* ``/proc/cpuinfo`` lists ``vmx`` or ``svm`` (x86 hardware virtualisation), AND
* ``/sys/module/kvm_pvm`` is absent.

``SMARTVM_ACCEL=kvm|tcg`` (or the ``override`` argument, e.g. exec_sandbox's
``force_emulation``) forces a choice; forcing KVM where the probe says no is
honoured but the reason says so.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from smartvm.errors import ErrorCode, SmartVMError

__all__ = ["ACCEL_ENV_VAR", "AccelChoice", "Accelerator", "choose_accelerator", "probe_kvm"]

log = logging.getLogger(__name__)

Accelerator = Literal["kvm", "tcg"]
ACCEL_ENV_VAR = "SMARTVM_ACCEL"

_VIRT_FLAG = re.compile(r"^flags\s*:.*\b(vmx|svm)\b", re.MULTILINE)


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator QEMU will use and why (shown in logs, ``get_info`` and metrics)."""

    accel: Accelerator
    reason: str


def probe_kvm(
    *,
    dev_kvm: Path = Path("/dev/kvm"),
    cpuinfo_text: str | None = None,
    sys_module_dir: Path = Path("/sys/module"),
    access: Callable[[Path, int], bool] = os.access,
) -> tuple[bool, str]:
    """Return ``(usable, reason)`` for KVM. Inputs are parameters so tests can feed fakes."""
    if not dev_kvm.exists():
        return False, f"{dev_kvm} does not exist"
    if not access(dev_kvm, os.R_OK | os.W_OK):
        return False, f"{dev_kvm} is not read-write for this user"
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return False, f"cannot read /proc/cpuinfo: {exc}"
    if not _VIRT_FLAG.search(cpuinfo_text):
        return False, "the CPU exposes neither vmx nor svm"
    if (sys_module_dir / "kvm_pvm").exists():
        return False, "KVM is the paravirtual kvm_pvm module, on which ordinary guests hang"
    return True, f"{dev_kvm} is read-write, the CPU exposes vmx/svm and the module is not kvm_pvm"


def choose_accelerator(
    override: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dev_kvm: Path = Path("/dev/kvm"),
    cpuinfo_text: str | None = None,
    sys_module_dir: Path = Path("/sys/module"),
) -> AccelChoice:
    """Pick ``kvm`` or ``tcg``; ``override`` beats ``$SMARTVM_ACCEL`` beats the probe. Logs one line."""
    env = os.environ if environ is None else environ
    forced = override if override is not None else (env.get(ACCEL_ENV_VAR) or None)
    choice: AccelChoice
    if forced is not None:
        value = forced.strip().lower()
        source = "argument" if override is not None else f"${ACCEL_ENV_VAR}"
        if value not in ("kvm", "tcg"):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"accelerator must be 'kvm' or 'tcg', got {forced!r} (from {source})",
                details={"accelerator": forced, "source": source},
            )
        if value == "tcg":
            choice = AccelChoice("tcg", f"forced by {source}")
        else:
            usable, why = probe_kvm(dev_kvm=dev_kvm, cpuinfo_text=cpuinfo_text, sys_module_dir=sys_module_dir)
            note = "" if usable else f" although the probe says no: {why}"
            choice = AccelChoice("kvm", f"forced by {source}{note}")
    else:
        usable, why = probe_kvm(dev_kvm=dev_kvm, cpuinfo_text=cpuinfo_text, sys_module_dir=sys_module_dir)
        choice = AccelChoice("kvm", why) if usable else AccelChoice("tcg", f"software emulation: {why}")
    log.info("QEMU accelerator: %s (%s)", choice.accel, choice.reason)
    return choice
