from __future__ import annotations

import io

from click.testing import CliRunner
from rich.console import Console

from exec_sandbox.cli import main
from exec_sandbox.cli.progress import RichProgress
from exec_sandbox.images.progress import ProgressEvent, ProgressKind


def test_progress_without_terminal_prints_steps_and_heartbeats() -> None:
    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=False, width=200), log_every_s=0.0)
    progress(ProgressEvent("kernel: compile vmlinux", ProgressKind.START, "make -j2"))
    progress(ProgressEvent("kernel: compile vmlinux", ProgressKind.UPDATE, "25 lines: CC init/main.o", 3.0))
    progress(ProgressEvent("kernel: compile vmlinux", ProgressKind.DONE, "", 200.0))
    progress(ProgressEvent("image python", ProgressKind.CACHED, "python-0123"))
    progress.close()
    text = out.getvalue()
    assert "→ kernel: compile vmlinux make -j2" in text
    assert "25 lines: CC init/main.o" in text
    assert "✓ kernel: compile vmlinux (200.0s)" in text
    assert "image python: cached (python-0123)" in text


def test_build_rejects_unknown_language() -> None:
    result = CliRunner().invoke(main, ["images", "build", "--language", "cobol"])
    assert result.exit_code == 2
    assert "cobol" in result.output and "python" in result.output


def test_images_group_lists_its_commands() -> None:
    result = CliRunner().invoke(main, ["images", "--help"])
    assert result.exit_code == 0
    for command in ("build", "list", "prune"):
        assert command in result.output
