"""``sbx run`` without VMs: argument parsing, download planning, exit-code mapping, error lines, JSON."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import exec_sandbox.cli.run as cli_run
from exec_sandbox.cli import main
from exec_sandbox.cli.args import (
    Download,
    Upload,
    check_uploads,
    parse_download_spec,
    parse_env_specs,
    parse_upload_spec,
    plan_downloads,
    resolve_source,
    write_download,
)
from exec_sandbox.cli.errors import ExitCode, exit_code_for_error, exit_code_for_result, format_error
from exec_sandbox.cli.run import download_records, result_json
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    ImageBuildError,
    SandboxError,
    SandboxInputError,
    SandboxPermanentError,
    VmCapacityError,
)
from exec_sandbox.models import ExecutionResult, TimingBreakdown
from exec_sandbox.sandbox.scheduler import RunResult


def _result(**fields: object) -> ExecutionResult:
    base: dict[str, object] = {
        "stdout": "1\n",
        "stderr": "",
        "exit_code": 0,
        "execution_time_ms": 12.5,
        "timing": TimingBreakdown(boot_ms=1900.0, execute_ms=12.5, total_ms=2400.0),
        "language": "python",
        "accelerator": "tcg",
        "vm_id": "vm-1",
    }
    base.update(fields)
    return ExecutionResult.model_validate(base)


# ---- source / language --------------------------------------------------------------------------


def test_inline_code_defaults_to_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = resolve_source("print(1)", None)
    assert (source.code, source.language, source.origin) == ("print(1)", "python", "<argument>")


@pytest.mark.parametrize(
    ("option", "language"),
    [("python", "python"), ("javascript", "javascript"), ("raw", "raw"), ("js", "javascript"), ("sh", "raw")],
)
def test_language_option_and_aliases(
    option: str, language: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_source("echo hi", option).language == language


@pytest.mark.parametrize(
    ("name", "language"),
    [
        ("a.py", "python"),
        ("b.js", "javascript"),
        ("c.mjs", "javascript"),
        ("d.sh", "raw"),
        ("E.PY", "python"),
    ],
)
def test_file_language_from_extension(name: str, language: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text("content ü\n")
    source = resolve_source(str(path), None)
    assert (source.code, source.language, source.origin) == ("content ü\n", language, str(path))


def test_language_option_beats_extension(tmp_path: Path) -> None:
    path = tmp_path / "script.py"
    path.write_text("echo hi")
    assert resolve_source(str(path), "raw").language == "raw"


def test_file_with_unknown_extension_needs_language(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("print(1)")
    with pytest.raises(SandboxInputError, match=r"\.txt"):
        resolve_source(str(path), None)
    assert resolve_source(str(path), "python").code == "print(1)"


def test_missing_file_name_is_an_error_not_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SandboxInputError, match=r"no such file: typo\.py") as info:
        resolve_source("typo.py", None)
    assert info.value.context["field"] == "FILE"
    # With an explicit language the text is code after all.
    assert resolve_source("typo.py", "python").code == "typo.py"


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SandboxInputError, match="not a regular file"):
        resolve_source(str(tmp_path), None)


def test_stdin_dash() -> None:
    source = resolve_source("-", "javascript", io.BytesIO(b"console.log(1)\n"))
    assert (source.code, source.language, source.origin) == ("console.log(1)\n", "javascript", "<stdin>")
    assert resolve_source("-", None, io.BytesIO(b"print(2)")).language == "python"


def test_non_utf8_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bin.py"
    path.write_bytes(b"print(1)\n\xff\xfe")
    with pytest.raises(SandboxInputError, match="offset 9"):
        resolve_source(str(path), None)


def test_unknown_language_names_the_valid_ones() -> None:
    with pytest.raises(SandboxInputError, match="python, javascript, raw") as info:
        resolve_source("x", "cobol")
    assert info.value.context["field"] == "--language"


# ---- -e ------------------------------------------------------------------------------------------


def test_env_forms() -> None:
    env = parse_env_specs(
        ["A=1", "B=", "C=x=y", "HOST_ONLY", "A=2"], {"HOST_ONLY": "from host", "UNRELATED": "z"}
    )
    assert env == {"A": "2", "B": "", "C": "x=y", "HOST_ONLY": "from host"}


def test_env_name_missing_from_host() -> None:
    with pytest.raises(SandboxInputError, match="NOT_THERE is not set in the host environment"):
        parse_env_specs(["NOT_THERE"], {})


@pytest.mark.parametrize("spec", ["1BAD=x", "A B=1", "=v", "SBX_FD=1", "PYTHONUNBUFFERED=0", "A=nul\x00"])
def test_env_invalid(spec: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        parse_env_specs([spec], {})
    assert info.value.context["field"].startswith("-e")


# ---- --upload / --download -----------------------------------------------------------------------


def test_upload_spec_forms(tmp_path: Path) -> None:
    local = tmp_path / "data.csv"
    local.write_text("a,b\n")
    assert parse_upload_spec(f"{local}:in/data.csv") == Upload(local, "in/data.csv")
    assert parse_upload_spec(f"{local}:/home/sandbox/x.csv") == Upload(local, "x.csv")
    assert parse_upload_spec(str(local)) == Upload(local, "data.csv")
    # LOCAL may contain ':' (the split is at the last one).
    odd = tmp_path / "a:b"
    odd.write_text("")
    assert parse_upload_spec(f"{odd}:dest") == Upload(odd, "dest")


@pytest.mark.parametrize(
    ("spec_suffix", "message"),
    [
        (":../escape", "escapes the sandbox work dir"),
        (":/etc/passwd", "outside the sandbox work dir"),
        (":.", "work dir itself"),
    ],
)
def test_upload_bad_guest_path(spec_suffix: str, message: str, tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_text("x")
    with pytest.raises(SandboxInputError, match=message):
        parse_upload_spec(f"{local}{spec_suffix}")


def test_upload_bad_local(tmp_path: Path) -> None:
    with pytest.raises(SandboxInputError, match="no such local file"):
        parse_upload_spec(f"{tmp_path}/missing:x")
    with pytest.raises(SandboxInputError, match="not a regular file"):
        parse_upload_spec(f"{tmp_path}:x")
    with pytest.raises(SandboxInputError, match="LOCAL is empty"):
        parse_upload_spec(":x")


def test_two_uploads_to_one_guest_path_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    check_uploads([Upload(a, "x"), Upload(b, "y")])
    with pytest.raises(SandboxInputError, match="both go to x"):
        check_uploads([Upload(a, "x"), Upload(b, "x")])


def test_download_spec_forms(tmp_path: Path) -> None:
    (tmp_path / "outdir").mkdir()
    assert parse_download_spec("out.txt", tmp_path) == Download("out.txt", tmp_path / "out.txt")
    assert parse_download_spec("/home/sandbox/a/b.bin", tmp_path) == Download("a/b.bin", tmp_path / "b.bin")
    assert parse_download_spec("r.json:saved.json", tmp_path) == Download("r.json", tmp_path / "saved.json")
    assert parse_download_spec("r.json:/tmp/abs.json", tmp_path) == Download("r.json", Path("/tmp/abs.json"))
    assert parse_download_spec("r.json:outdir", tmp_path) == Download("r.json", tmp_path / "outdir/r.json")
    assert parse_download_spec("r.json:new/", tmp_path) == Download("r.json", tmp_path / "new/r.json")
    # LOCAL may contain ':' (the split is at the first one).
    assert parse_download_spec("r.json:a:b", tmp_path) == Download("r.json", tmp_path / "a:b")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("../x", "escapes the sandbox work dir"),
        ("/etc/shadow", "outside the sandbox work dir"),
        (".", "work dir itself"),
        ("/home/sandbox", "work dir itself"),
        ("x:", "LOCAL after ':' is empty"),
        ("", "must not be empty"),
    ],
)
def test_download_bad_spec(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SandboxInputError, match=message):
        parse_download_spec(spec, tmp_path)


def test_plan_downloads_refuses_existing_files_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "exists.txt").write_text("keep me")
    plan = [Download("a", tmp_path / "new.txt"), Download("b", tmp_path / "exists.txt")]
    with pytest.raises(SandboxInputError, match="use --force") as info:
        plan_downloads(plan, force=False)
    assert info.value.context["local"] == str(tmp_path / "exists.txt")
    plan_downloads(plan, force=True)
    assert (tmp_path / "exists.txt").read_text() == "keep me"  # planning never writes


def test_plan_downloads_other_problems(tmp_path: Path) -> None:
    with pytest.raises(SandboxInputError, match="also the target of a"):
        plan_downloads([Download("a", tmp_path / "x"), Download("b", tmp_path / "x")], force=True)
    with pytest.raises(SandboxInputError, match="does not exist"):
        plan_downloads([Download("a", tmp_path / "no" / "x")], force=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(SandboxInputError, match="is a directory"):
        plan_downloads([Download("a", tmp_path / "d")], force=True)


def test_write_download(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    write_download(b"first", target, force=False)
    assert target.read_bytes() == b"first"
    with pytest.raises(SandboxInputError, match="use --force"):
        write_download(b"second", target, force=False)
    assert target.read_bytes() == b"first"
    write_download(b"third", target, force=True)
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary file left


def test_save_downloads_reports_what_was_not_saved(tmp_path: Path) -> None:
    (tmp_path / "taken.txt").write_text("keep")
    result = RunResult(
        **_result().model_dump(),
        files={"a.txt": b"A", "taken.txt": b"T"},
        download_errors={"gone.txt": "no such file or directory"},
    )
    downloads = (
        Download("a.txt", tmp_path / "a.txt"),
        Download("gone.txt", tmp_path / "gone.txt"),
        Download("taken.txt", tmp_path / "taken.txt"),
    )
    request = cli_run._Request(
        source=resolve_source("print(1)", "python"),
        timeout=None,
        memory=None,
        env={},
        uploads=(),
        downloads=downloads,
        as_json=False,
        force=False,
    )
    written, failed = cli_run._save_downloads(result, request)
    assert written == [downloads[0]]
    assert (tmp_path / "a.txt").read_bytes() == b"A"
    assert failed["gone.txt"] == "no such file or directory"
    assert "use --force" in failed["taken.txt"]
    assert (tmp_path / "taken.txt").read_text() == "keep"
    assert not (tmp_path / "gone.txt").exists()


# ---- exit codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, 0),
        ({"exit_code": 3}, 3),
        ({"exit_code": 255}, 255),
        ({"exit_code": 137, "signal": 9}, 137),
        ({"exit_code": -1, "timed_out": True}, 124),
        ({"exit_code": 137, "oom_killed": True}, 137),
        ({"exit_code": 1, "oom_killed": True}, 137),
        ({"exit_code": 300}, 125),
        ({"exit_code": -5}, 125),
    ],
)
def test_exit_code_for_result(fields: dict[str, object], code: int) -> None:
    assert exit_code_for_result(_result(**fields)) == code


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SandboxInputError("bad"), 126),
        (VmCapacityError("full"), 125),
        (ImageBuildError("no", step="rootfs"), 125),
        (SandboxPermanentError("no"), 125),
        (GuestAgentError("frame"), 125),
        (CommunicationOutcomeUnknownError("lost"), 125),
        (SandboxError("generic"), 125),
        (OSError(28, "No space left on device"), 125),
    ],
)
def test_exit_code_for_error(exc: BaseException, code: int) -> None:
    assert exit_code_for_error(exc) == code


def test_exit_codes_are_documented() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    assert cli_run.__doc__ is not None
    for code in ExitCode:
        assert str(int(code)) in result.output, code
        assert str(int(code)) in cli_run.__doc__, code


# ---- error lines and JSON ------------------------------------------------------------------------


def test_format_error_is_one_line_with_context() -> None:
    exc = SandboxInputError(
        "timeout_seconds: too large\n(second line)", context={"field": "x", "limit": 3600}
    )
    line = format_error(exc)
    assert "\n" not in line
    assert line.startswith("SandboxInputError: timeout_seconds: too large (second line)")
    assert "field=x" in line and "limit=3600" in line


def test_format_error_transient_stderr_and_unknown_outcome() -> None:
    assert "safe to retry" in format_error(VmCapacityError("no capacity"))
    build = format_error(ImageBuildError("mkfs failed", step="pack", stderr="line 1\nmkfs.ext4: boom\n"))
    assert "step=pack" in build and "mkfs.ext4: boom" in build
    assert "may have run" in format_error(CommunicationOutcomeUnknownError("agent died"))
    assert format_error(OSError(28, "No space left on device")).startswith("OSError: [Errno 28]")


def test_result_json_shape(tmp_path: Path) -> None:
    files = {"out.txt": b"hello"}
    records = download_records([Download("out.txt", tmp_path / "o.txt")], files)
    result = RunResult(
        **_result(exit_code=2).model_dump(), files=files, download_errors={"gone.txt": "no such file"}
    )
    doc = json.loads(json.dumps(result_json(result, records, 2)))
    assert "files" not in doc  # the contents went to disk, not into the document
    assert doc["download_errors"] == {"gone.txt": "no such file"}
    assert doc["stdout"] == "1\n" and doc["exit_code"] == 2 and doc["sbx_exit_code"] == 2
    assert doc["timing"]["boot_ms"] == 1900.0 and doc["language"] == "python"
    assert doc["downloads"] == [
        {
            "guest_path": "out.txt",
            "local_path": str(tmp_path / "o.txt"),
            "size_bytes": 5,
            "sha256": hashlib.sha256(b"hello").hexdigest(),
        }
    ]
    assert set(ExecutionResult.model_fields) <= set(doc)
    assert set(doc) == set(RunResult.model_fields) - {"files"} | {"downloads", "sbx_exit_code"}


# ---- the command, up to the point where it would boot a VM ---------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "-t", "abc", "print(1)"], "'abc' is not a valid float"),
        (["run", "--no-such-option", "x"], "No such option"),
        (["run"], "Missing argument"),
        (["run", "-l", "cobol", "x"], "unknown language 'cobol'"),
        (["run", "-e", "1X=2", "x"], "invalid variable name"),
        (["run", "missing.js"], "no such file: missing.js"),
        (["run", "--upload", "nope.csv:in.csv", "x"], "no such local file"),
        (["run", "--download", "../../etc/passwd", "x"], "escapes the sandbox work dir"),
        (["run", "--allow-domain", "bad..name", "x"], "allowed_domains"),
    ],
)
def test_invalid_input_exits_126_without_traceback(
    args: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 126, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_existing_download_target_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.txt").write_text("precious")
    result = CliRunner().invoke(main, ["run", "--download", "out.txt", "print(1)"])
    assert result.exit_code == 126
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sbx: error: SandboxInputError: --download:")
    assert "--force" in lines[0]
    assert (tmp_path / "out.txt").read_text() == "precious"


def test_bad_scheduler_env_is_invalid_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "EXEC_SANDBOX_SCHEDULER_DEFAULT_MEMORY_MB": "lots"}
    result = CliRunner().invoke(main, ["run", "print(1)"], env=env)
    assert result.exit_code == 126
    assert "EXEC_SANDBOX_SCHEDULER_DEFAULT_MEMORY_MB" in result.stderr


def test_json_error_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--json", "-e", "SBX_X=1", "print(1)"])
    assert result.exit_code == 126
    doc = json.loads(result.stdout)
    assert doc["sbx_exit_code"] == 126
    assert doc["error"]["type"] == "SandboxInputError"
    assert doc["error"]["retryable"] is False
    assert "reserved" in doc["error"]["message"]
    assert doc["error"]["context"]["field"].startswith("-e")


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--debug", "-l", "cobol", "x"])
    assert result.exit_code == 126
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("sbx: error: SandboxInputError:")
