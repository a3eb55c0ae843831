"""What the envd services share: the sandbox bound to a request, path mapping, the caller's user."""

from __future__ import annotations

import base64
import binascii
import contextvars
import posixpath
from typing import Any, Final

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from exec_sandbox.server.errors import BadRequestError, ServeError
from exec_sandbox.server.registry import SandboxRecord
from exec_sandbox.validation import DEFAULT_WORKDIR

__all__ = [
    "CURRENT_SANDBOX",
    "E2B_HOME",
    "as_root",
    "current_record",
    "e2b_path",
    "guest_path",
    "path_or_error",
]

CURRENT_SANDBOX: contextvars.ContextVar[SandboxRecord] = contextvars.ContextVar("sbx_serve_sandbox")
E2B_HOME: Final = "/home/user"
_USERS: Final = {"user": False, "root": True}


def guest_path(path: str) -> str:
    """The guest path for an SDK path: ``/home/user`` is our work dir; relative paths start there."""
    if not path:
        raise BadRequestError("path must not be empty")
    if "\x00" in path:
        raise BadRequestError("path must not contain NUL characters")
    if path == E2B_HOME or path.startswith(E2B_HOME + "/"):
        path = DEFAULT_WORKDIR + path[len(E2B_HOME) :]
    elif path == "~" or path.startswith("~/"):
        path = DEFAULT_WORKDIR + path[1:]
    if not path.startswith("/"):
        path = posixpath.join(DEFAULT_WORKDIR, path)
    return posixpath.normpath(path)


def e2b_path(path: str) -> str:
    """The SDK's name of a guest path: the work dir is ``/home/user`` (a link to it in the guest)."""
    if path == DEFAULT_WORKDIR or path.startswith(DEFAULT_WORKDIR + "/"):
        return E2B_HOME + path[len(DEFAULT_WORKDIR):]
    return path


def current_record() -> SandboxRecord:
    try:
        return CURRENT_SANDBOX.get()
    except LookupError:  # the app always sets it; a missing one is a routing bug, not the caller's
        raise ConnectError(Code.INTERNAL, "no sandbox bound to this request") from None


def path_or_error(path: str) -> str:
    try:
        return guest_path(path)
    except ServeError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None



def as_root(ctx: RequestContext[Any, Any]) -> bool:
    """Whether the SDK asked for root: its ``user`` travels as HTTP Basic ``<user>:`` (no header:
    envd's default user, ``user``). Only ``user`` and ``root`` exist in our guests."""
    header = ctx.request_headers.get("authorization")
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    try:
        name = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        name = None
    if scheme.lower() != "basic" or name not in _USERS:
        raise ConnectError(Code.INVALID_ARGUMENT, f"unknown user {name!r} (this sandbox has user and root)")
    return _USERS[name]
