"""The code-interpreter API of ``e2b-code-interpreter`` (its Jupyter-side server, port 49999).

- ``POST /execute`` ``{code, context_id, language, env_vars}`` streams JSON lines:
  ``stdout`` / ``stderr`` (``text``, ``timestamp``) as the code prints, then ``result`` (Python: the
  value of a final expression, as ``text``), ``error`` (``name``, ``value``, ``traceback``) when the
  code failed, ``number_of_executions`` and ``end_of_execution``.
- ``/contexts``: create (``{language, cwd}``), list, delete, restart. A context is a
  :class:`~exec_sandbox.sandbox.session.Session` of its language (``python``, ``javascript``; ``bash``/``sh``
  run in the guest's shell), made on its first execution, so its state (variables, imports) is kept
  between executions. Without ``context_id`` the language's default context is used.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from exec_sandbox.errors import SandboxError, SandboxInputError
from exec_sandbox.models import ExecutionResult, Language
from exec_sandbox.server import metrics
from exec_sandbox.server.envd import CURRENT_SANDBOX
from exec_sandbox.server.errors import BadRequestError, NotFoundError, QuotaExceededError
from exec_sandbox.server.registry import CodeContext, SandboxRecord
from exec_sandbox.validation import DEFAULT_WORKDIR

__all__ = [
    "PYTHON_PRELUDE",
    "RESULT_HOOK",
    "RESULT_MARKER",
    "interpreter_routes",
    "parse_error",
    "python_with_result",
]

RESULT_MARKER: Final = "\x1esbx-result:"
RESULT_HOOK: Final = "__sbx_result__"
# Run once in each Python context before its first cell (not counted as an execution).
PYTHON_PRELUDE: Final = f"""
def {RESULT_HOOK}(value):
    if value is not None:
        import json as _json
        print({RESULT_MARKER!r} + _json.dumps({{"text": repr(value)}}), flush=True)
"""
_LANGUAGES: Final[dict[str, Language]] = {
    "python": "python",
    "python3": "python",
    "javascript": "javascript",
    "js": "javascript",
    "bash": "raw",
    "sh": "raw",
}
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning)?): ?(.*)$")


def python_with_result(code: str) -> str:
    """``code`` whose final expression statement (if any) also prints a result line to stdout.

    Only the last statement changes (in place, same line numbers), into a call that prints
    ``RESULT_MARKER + json`` for a non-None value, like a notebook's ``Out[n]``.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    segment = ast.get_source_segment(code, last.value)
    if segment is None:
        return code
    lines = code.splitlines(keepends=True)
    head = "".join(lines[: last.lineno - 1]) + lines[last.lineno - 1][: last.col_offset]
    return f"{head}{RESULT_HOOK}({segment}\n)\n"


def parse_error(stderr: str, language: Language) -> tuple[str, str]:
    """(name, value) of the exception a failed execution reported on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    candidates = reversed(lines) if language == "python" else iter(lines)
    for line in candidates:
        m = _ERROR_LINE.match(line.strip())
        if m and not line.startswith(" "):
            return m.group(1), m.group(2)
    return ("Error", lines[-1].strip() if lines else "execution failed")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _language(name: str | None) -> Language:
    lang = _LANGUAGES.get((name or "python").lower())
    if lang is None:
        raise BadRequestError(
            f"language {name!r} is not supported by sbx serve (supported: python, javascript, bash)"
        )
    return lang


def _context_json(ctx: CodeContext) -> dict[str, Any]:
    shown = {"raw": "bash"}.get(ctx.language, ctx.language)
    return {"id": ctx.id, "language": shown, "cwd": ctx.cwd}


def _new_context(record: SandboxRecord, language: Language, cwd: str | None) -> CodeContext:
    if len(record.contexts) >= record.max_contexts:
        raise QuotaExceededError(f"a sandbox may hold {record.max_contexts} code contexts at once")
    ctx = CodeContext(id=secrets.token_hex(8), language=language, cwd=cwd or DEFAULT_WORKDIR)
    record.contexts[ctx.id] = ctx
    return ctx


def _default_context(record: SandboxRecord, language: Language) -> CodeContext:
    cid = record.default_contexts.get(language)
    if cid is not None and cid in record.contexts:
        return record.contexts[cid]
    ctx = _new_context(record, language, None)
    record.default_contexts[language] = ctx.id
    return ctx


async def _session_of(request: Request, record: SandboxRecord, ctx: CodeContext) -> Any:
    if ctx.language == "raw":
        return record.session
    if ctx.session is None or ctx.session.closed:
        ctx.prepared = False
        ctx.session = None
        registry = request.app.state.registry
        async with registry.context_vm(record.owner, record.memory_mb):
            ctx.session = await registry.scheduler.session(
                ctx.language,
                memory_mb=record.memory_mb,
                env_vars=record.env_vars,
                idle_timeout_seconds=86400.0,
                allowed_domains=record.allowed_domains or None,  # the sandbox's allowlist
            )
    return ctx.session


async def _json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (an empty body is ``{}``), else a 400."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequestError("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    return body


async def execute(request: Request) -> Response:
    record = CURRENT_SANDBOX.get()
    body = await _json_object(request)
    if not isinstance(body.get("code"), str):
        raise BadRequestError("code (a string) is required")
    context_id = body.get("context_id")
    if context_id:
        ctx = record.contexts.get(context_id)
        if ctx is None:
            raise NotFoundError(f"context {context_id!r} not found")
    else:
        ctx = _default_context(record, _language(body.get("language")))
    env = body.get("env_vars") or {}
    if not isinstance(env, dict):
        raise BadRequestError("env_vars must be an object")
    code: str = body["code"]
    if ctx.language != "raw" and (ctx.session is None or ctx.session.closed):
        # A context VM will be made: refuse now with a 429 rather than inside the stream.
        request.app.state.registry.reserve_memory(record.owner, record.memory_mb)
    if ctx.language == "python":
        code = python_with_result(code)
    return StreamingResponse(_run(request, record, ctx, code, env), media_type="application/x-ndjson")


async def _run(
    request: Request, record: SandboxRecord, ctx: CodeContext, code: str, env: dict[str, str]
) -> AsyncIterator[str]:
    def line(obj: dict[str, Any]) -> str:
        return json.dumps(obj) + "\n"

    queue: asyncio.Queue[tuple[Literal["stdout", "stderr"], str]] = asyncio.Queue()
    results: list[str] = []
    pending = ""  # stdout not yet split into lines (result lines must be whole to be recognised)

    async with ctx.lock:
        try:
            session = await _session_of(request, record, ctx)
            if ctx.language == "python" and not ctx.prepared:
                await session.exec(PYTHON_PRELUDE, timeout_seconds=30)
                ctx.prepared = True
                ctx.hidden_execs = session.exec_count
        except SandboxError as exc:
            yield line({"type": "error", "name": "SandboxError", "value": exc.message, "traceback": ""})
            return
        started = time.monotonic()
        task = asyncio.get_running_loop().create_task(
            session.exec(
                code,
                timeout_seconds=max(1.0, min(record.end_at - _time(), record.command_timeout_seconds)),
                env_vars={str(k): str(v) for k, v in env.items()},
                on_stdout=lambda s: queue.put_nowait(("stdout", s)),
                on_stderr=lambda s: queue.put_nowait(("stderr", s)),
            )
        )
        task.add_done_callback(lambda _t: metrics.observe_run("cell", time.monotonic() - started))

        def stdout_lines(text: str, final: bool) -> list[str]:
            nonlocal pending
            pending += text
            *full, pending = pending.split("\n")
            out = [f + "\n" for f in full]
            if final and pending:
                out.append(pending)
                pending = ""
            keep = []
            for piece in out:
                at = piece.find(RESULT_MARKER)  # after output that did not end its line, mid-line
                if at < 0:
                    keep.append(piece)
                    continue
                try:
                    results.append(json.loads(piece[at + len(RESULT_MARKER) :])["text"])
                except (ValueError, KeyError, TypeError):
                    keep.append(piece)
                    continue
                if at:
                    keep.append(piece[:at])
            return keep

        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
            chunks = [getter.result()] if getter in done else []
            if task in done:
                while not queue.empty():
                    chunks.append(queue.get_nowait())
            for stream, text in chunks:
                if stream == "stderr":
                    yield line({"type": "stderr", "text": text, "timestamp": _now()})
                    continue
                for piece in stdout_lines(text, final=False):
                    yield line({"type": "stdout", "text": piece, "timestamp": _now()})
            if task in done:
                for piece in stdout_lines("", final=True):
                    yield line({"type": "stdout", "text": piece, "timestamp": _now()})
                break
        try:
            result: ExecutionResult = task.result()
        except SandboxInputError as exc:
            yield line({"type": "error", "name": "ValueError", "value": exc.message, "traceback": ""})
            return
        except SandboxError as exc:
            yield line({"type": "error", "name": "SandboxError", "value": exc.message, "traceback": ""})
            return
        for text in results:
            yield line({"type": "result", "text": text, "is_main_result": True})
        if result.timed_out:
            yield line(
                {"type": "error", "name": "TimeoutError", "value": "execution timed out", "traceback": ""}
            )
        elif result.exit_code != 0:
            name, value = parse_error(result.stderr, ctx.language)
            yield line({"type": "error", "name": name, "value": value, "traceback": result.stderr})
        yield line({"type": "number_of_executions", "execution_count": session.exec_count - ctx.hidden_execs})
        yield line({"type": "end_of_execution"})


def _time() -> float:
    return time.time()


async def create_context(request: Request) -> Response:
    record = CURRENT_SANDBOX.get()
    body = await _json_object(request)
    ctx = _new_context(record, _language(body.get("language")), body.get("cwd"))
    return JSONResponse(_context_json(ctx))


async def list_contexts(request: Request) -> Response:
    record = CURRENT_SANDBOX.get()
    return JSONResponse([_context_json(c) for c in record.contexts.values()])


async def delete_context(request: Request) -> Response:
    record = CURRENT_SANDBOX.get()
    ctx = record.contexts.pop(request.path_params["context_id"], None)
    if ctx is None:
        raise NotFoundError(f"context {request.path_params['context_id']!r} not found")
    for lang, cid in list(record.default_contexts.items()):
        if cid == ctx.id:
            del record.default_contexts[lang]
    if ctx.session is not None:
        await ctx.session.close()
    return Response(status_code=204)


async def restart_context(request: Request) -> Response:
    record = CURRENT_SANDBOX.get()
    ctx = record.contexts.get(request.path_params["context_id"])
    if ctx is None:
        raise NotFoundError(f"context {request.path_params['context_id']!r} not found")
    async with ctx.lock:
        if ctx.session is not None:
            old, ctx.session = ctx.session, None
            ctx.prepared = False
            await old.close()
    return Response(status_code=204)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def interpreter_routes() -> list[Route]:
    return [
        Route("/execute", execute, methods=["POST"]),
        Route("/contexts", create_context, methods=["POST"]),
        Route("/contexts", list_contexts, methods=["GET"]),
        Route("/contexts/{context_id}", delete_context, methods=["DELETE"]),
        Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
