"""``sbx serve``: the click command (kept import-light; the server modules load when it runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["KEEP_ALIVE_S", "mcp", "serve"]

KEEP_ALIVE_S = 75


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1; others expose it).")
@click.option("--port", type=int, default=None, help="Port (default 3000).")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="An accepted API key (repeatable; also $SBX_API_KEYS, comma separated, or the config file).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file: api_keys / api_key_sha256 lists and any ServeConfig field.",
)
@click.option("--max-sandboxes-per-key", type=int, default=None, help="Concurrent sandboxes per key.")
@click.option(
    "--max-memory-mb-per-key", type=int, default=None, help="Guest RAM (MiB) a key may hold (default: no cap)"
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where paused sandboxes and snapshot templates are kept (default: the user state dir).",
)
@click.option(
    "--host-override",
    "host_overrides",
    multiple=True,
    metavar="NAME=ADDRESS",
    help="Resolve an allowlisted name to ADDRESS for the sandboxes' egress (repeatable).",
)
@click.option(
    "--egress-allow-private",
    is_flag=True,
    default=None,
    help="Let allowlisted names resolve to loopback/private addresses (any name a client lists: "
    "this host's services become reachable; for trusted keys only).",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default=None,
    help="One JSON object per line, or text (default: text on a terminal, else JSON).",
)
def serve(
    host: str | None,
    port: int | None,
    api_keys: tuple[str, ...],
    config_file: Path | None,
    max_sandboxes_per_key: int | None,
    max_memory_mb_per_key: int | None,
    state_dir: Path | None,
    host_overrides: tuple[str, ...],
    egress_allow_private: bool | None,
    log_level: str,
    log_format: str | None,
) -> None:
    """Serve the E2B API (control plane, envd, code interpreter) on this machine's microVMs."""
    import uvicorn

    from exec_sandbox.errors import SandboxError, SandboxInputError
    from exec_sandbox.server.app import create_app
    from exec_sandbox.server.config import API_KEYS_ENV, load_serve_config
    from exec_sandbox.server.logs import configure_logging, default_log_format

    overrides = dict(item.partition("=")[::2] for item in host_overrides)
    try:
        if any(not name or not addr for name, addr in overrides.items()):
            raise SandboxInputError(
                "--host-override takes NAME=ADDRESS", context={"field": "host_overrides"}
            )
        config = load_serve_config(
            api_keys=api_keys,
            config_file=config_file,
            host=host,
            port=port,
            max_sandboxes_per_key=max_sandboxes_per_key,
            max_memory_mb_per_key=max_memory_mb_per_key,
            state_dir=state_dir,
            log_format=log_format,
            host_overrides=overrides or None,
            egress_allow_private=egress_allow_private,
        )
    except SandboxError as exc:
        click.echo(f"sbx serve: {exc}", err=True)
        sys.exit(2)
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        click.echo(
            f"sbx serve: listening on {config.host}: other machines can reach this service "
            "(plain HTTP: put TLS in front of it)",
            err=True,
        )
    if not config.api_key_hashes:
        click.echo(
            f"sbx serve: no API key: pass --api-key KEY, set ${API_KEYS_ENV} or use --config", err=True
        )
        sys.exit(2)
    configure_logging(config.log_format or default_log_format(), log_level)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=log_level,
        log_config=None,  # our handler (configure_logging) formats uvicorn's lines too
        access_log=False,  # our per-request line (with sandbox, owner, duration) is the access log
        lifespan="on",
        timeout_graceful_shutdown=10,
        # Longer than the SDKs' pooled-connection expiry (httpx: 5 s), so the server never closes a
        # keep-alive connection just as a client reuses it (a POST is not retried on that race).
        timeout_keep_alive=KEEP_ALIVE_S,
    )


@click.command("mcp")
def mcp() -> None:
    """Serve the sandbox MCP tools over stdio (for MCP clients that launch a command).

    The Scheduler reads ``EXEC_SANDBOX_SCHEDULER_*`` like ``sbx run`` (e.g. ``..._HOST_OVERRIDES``,
    ``..._EGRESS_ALLOW_PRIVATE`` for the tools' ``allowed_domains``)."""
    import asyncio

    from exec_sandbox.config import SchedulerConfig
    from exec_sandbox.errors import SandboxError
    from exec_sandbox.sandbox.scheduler import Scheduler
    from exec_sandbox.server.mcp import McpSandboxTools, build_mcp_server

    try:
        config = SchedulerConfig.from_env()
    except SandboxError as exc:
        click.echo(f"sbx mcp: {exc}", err=True)
        sys.exit(2)

    async def run() -> None:
        tools = McpSandboxTools()
        async with Scheduler(config) as scheduler:
            tools.scheduler = scheduler
            try:
                await build_mcp_server(tools).run_stdio_async()
            finally:
                await tools.aclose()

    asyncio.run(run())
