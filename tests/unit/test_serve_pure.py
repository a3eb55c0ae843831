"""Pure parts of ``sbx serve``: key hashing and config, path and command mapping, stat parsing,
the Python result hook, error parsing, and the generated Connect stubs' wire names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.server.config import ServeConfig, hash_api_key, load_serve_config
from exec_sandbox.server.envd import guest_path, parse_stat_line
from exec_sandbox.server.envd_process import command_argv
from exec_sandbox.server.errors import BadRequestError
from exec_sandbox.server.interpreter import RESULT_HOOK, parse_error, python_with_result
from exec_sandbox.server.proto.filesystem import filesystem_pb
from exec_sandbox.server.proto.process import process_pb


def test_keys_are_stored_as_sha256_only() -> None:
    config = load_serve_config(api_keys=["alpha"], environ={"SBX_API_KEYS": "beta, gamma"})
    assert config.api_key_hashes == {hash_api_key(k) for k in ("alpha", "beta", "gamma")}
    assert hash_api_key("alpha") == hashlib.sha256(b"alpha").hexdigest()
    assert "alpha" not in config.model_dump_json()
    assert config.key_hash_for("alpha") == hash_api_key("alpha")
    assert config.key_hash_for("wrong") is None
    assert config.key_hash_for(None) is None
    assert config.host == "127.0.0.1"


def test_config_file_keys_hashes_and_settings(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text(
        f'api_keys = ["k1"]\napi_key_sha256 = ["{hash_api_key("k2")}"]\n'
        "max_sandboxes_per_key = 3\nport = 4000\n"
    )
    config = load_serve_config(config_file=f, environ={}, port=5000)
    assert config.key_hash_for("k1") and config.key_hash_for("k2")
    assert config.max_sandboxes_per_key == 3
    assert config.port == 5000  # the command line wins over the file


def test_config_rejects_typos_and_bad_digests(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text("max_sandboxez_per_key = 3\n")
    with pytest.raises(SandboxInputError):
        load_serve_config(config_file=f, environ={})
    with pytest.raises(ValueError):
        ServeConfig(api_key_hashes=frozenset({"not-a-digest"}))


def test_guest_path_maps_e2b_home_onto_the_work_dir() -> None:
    assert guest_path("/home/user") == "/home/sandbox"
    assert guest_path("/home/user/a/../b.txt") == "/home/sandbox/b.txt"
    assert guest_path("rel/x") == "/home/sandbox/rel/x"
    assert guest_path("~/x") == "/home/sandbox/x"
    assert guest_path("/tmp/x") == "/tmp/x"
    assert guest_path("/home/username") == "/home/username"
    with pytest.raises(BadRequestError):
        guest_path("")
    with pytest.raises(BadRequestError):
        guest_path("a\x00b")


def test_command_argv_runs_shells_as_the_guest_shell_and_programs_as_given() -> None:
    assert command_argv("/bin/bash", ["-l", "-c", "echo hi; cd /"], "/bin/sh") == [
        "/bin/sh", "-l", "-c", "echo hi; cd /"]
    assert command_argv("bash", ["-i", "-l"], "/bin/bash") == ["/bin/bash", "-i", "-l"]
    assert command_argv("ls", ["-la", "a b"], "/bin/sh") == ["ls", "-la", "a b"]


def test_parse_stat_line() -> None:
    entry = parse_stat_line("regular file|5|644|-rw-r--r--|sandbox|sandbox|1700000000|/home/sandbox/a|b")
    assert entry.name == "a|b"
    assert entry.path == "/home/user/a|b"  # the SDK's name of the work dir
    assert entry.type == filesystem_pb.FileType.FILE
    assert (entry.size, entry.mode, entry.permissions, entry.owner) == (5, 0o644, "-rw-r--r--", "sandbox")
    assert entry.modified_time is not None and entry.modified_time.seconds == 1700000000
    d = parse_stat_line("directory|4096|755|drwxr-xr-x|root|root|0|/")
    assert d.type == filesystem_pb.FileType.DIRECTORY and d.name == "/"
    link = parse_stat_line("symbolic link|3|777|lrwxrwxrwx|u|u|0|/x/l")
    assert link.type == filesystem_pb.FileType.SYMLINK and link.is_symlink


def test_python_result_hook_wraps_only_a_final_expression_in_place() -> None:
    assert python_with_result("x = 1\nx + 1") == f"x = 1\n{RESULT_HOOK}(x + 1\n)\n"
    assert python_with_result("x = 1") == "x = 1"
    assert python_with_result("def f(:") == "def f(:"  # a syntax error is left for the guest to report
    assert python_with_result("a = 1; a") == f"a = 1; {RESULT_HOOK}(a\n)\n"
    multi = python_with_result("print(1)\n(1 +\n 2)  # c")
    assert multi.startswith(f"print(1)\n{RESULT_HOOK}(") and multi.count("\n") >= 3


def test_parse_error() -> None:
    tb = 'Traceback (most recent call last):\n  File "<s>", line 1\nZeroDivisionError: division by zero\n'
    assert parse_error(tb, "python") == ("ZeroDivisionError", "division by zero")
    js = "<session-5>:1\nthrow new Error('boom')\n^\n\nError: boom\n    at <session-5>:1:7\n"
    assert parse_error(js, "javascript") == ("Error", "boom")
    assert parse_error("", "python") == ("Error", "execution failed")


def test_generated_stubs_serve_e2b_paths() -> None:
    """The Connect paths the E2B SDK calls: /<package>.<Service>/<Method>."""
    from exec_sandbox.server.envd import FilesystemService, ProcessService
    from exec_sandbox.server.proto.filesystem.filesystem_connect import FilesystemASGIApplication
    from exec_sandbox.server.proto.process.process_connect import ProcessASGIApplication

    proc = set(ProcessASGIApplication(ProcessService())._endpoints(ProcessService()))  # type: ignore[arg-type]
    fs = set(FilesystemASGIApplication(FilesystemService())._endpoints(FilesystemService()))  # type: ignore[arg-type]
    assert {"/process.Process/Start", "/process.Process/List", "/process.Process/CloseStdin"} <= proc
    assert {f"/filesystem.Filesystem/{m}" for m in ("Stat", "ListDir", "MakeDir", "Move", "Remove")} <= fs
    assert process_pb.ProcessEvent.EndEvent(exit_code=-3).exit_code == -3


def test_openapi_document_refs_resolve_and_match_our_responses() -> None:
    import json

    from jsonschema import Draft202012Validator

    from exec_sandbox.server.control import CreatedSandbox, ListedSandbox, openapi_document

    doc = openapi_document()
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        name = ref.removeprefix("#/components/schemas/")
        assert name in doc["components"]["schemas"], ref
    assert {"/sandboxes", "/v2/sandboxes", "/sandboxes/{sandboxID}/timeout"} <= set(doc["paths"])

    def check(name: str, instance: object) -> None:
        Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"}).validate(instance)

    created = CreatedSandbox(
        template_id="base", sandbox_id="i1", envd_access_token="t", traffic_access_token="t"
    )
    check("Sandbox", created.model_dump(by_alias=True))
    listed = ListedSandbox(template_id="base", sandbox_id="i1", started_at="x", end_at="y", memory_mb=256)
    check("ListedSandbox", listed.model_dump(by_alias=True))
    check("NewSandbox", {"templateID": "base", "timeout": 30, "envVars": {"A": "b"}})
    check("NewSandbox", {"templateID": "base", "network": {"allowOut": ["a.test"], "denyOut": ["0.0.0.0/0"]}})
    check("Error", {"code": 404, "message": "sandbox not found"})
