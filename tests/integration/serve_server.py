"""A real ``sbx serve`` (uvicorn) on 127.0.0.1 and a free port, in a thread, for the E2B SDK tests."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from exec_sandbox.server.app import ServeApp, create_app
from exec_sandbox.server.cli import KEEP_ALIVE_S
from exec_sandbox.server.config import load_serve_config

__all__ = ["KEY_A", "KEY_B", "RunningServer", "key_a_env", "running_server", "sdk_env", "serve_module"]

KEY_A = "e2b_test_key_a_0123456789"
KEY_B = "e2b_test_key_b_9876543210"


@dataclass
class RunningServer:
    url: str
    app: ServeApp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def running_server(**overrides: object) -> Iterator[RunningServer]:
    """Start the server with keys A and B; stop it (killing every sandbox) on exit. Its state dir is a
    fresh temp dir (removed after) unless ``state_dir`` is given; ``scheduler_factory`` (optional)
    makes its Scheduler, the other ``overrides`` are ServeConfig fields."""
    with contextlib.ExitStack() as stack:
        if "state_dir" not in overrides:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sbx-state-"))
            overrides["state_dir"] = Path(tmp)
        yield stack.enter_context(_running(overrides))


@contextlib.contextmanager
def _running(overrides: dict[str, object]) -> Iterator[RunningServer]:
    port = _free_port()
    factory: Any = overrides.pop("scheduler_factory", None)
    config = load_serve_config(api_keys=[KEY_A, KEY_B], environ={}, host="127.0.0.1", port=port, **overrides)
    app = create_app(config, factory)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    thread = threading.Thread(target=server.run, name="sbx-serve-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("sbx serve did not start")
        time.sleep(0.1)
    try:
        yield RunningServer(url=url, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextlib.contextmanager
def sdk_env(url: str, key: str) -> Iterator[None]:
    """The three env vars that point the unmodified E2B SDKs at ``url``."""
    names = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")
    old = {n: os.environ.get(n) for n in names}
    os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": key})
    try:
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@pytest.fixture(scope="module")
def serve_module() -> Iterator[RunningServer]:
    """One server for a test module (import it with ``key_a_env`` into the module)."""
    with running_server() as srv:
        yield srv


@pytest.fixture
def key_a_env(serve_module: RunningServer) -> Iterator[str]:
    """The SDK pointed at the module's server with key A; yields its URL."""
    with sdk_env(serve_module.url, KEY_A):
        yield serve_module.url
