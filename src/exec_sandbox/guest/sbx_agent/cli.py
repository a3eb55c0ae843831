"""Command line: options (a fast path without argparse on the boot path), and ``main``."""

from __future__ import annotations

import os
import sys
import time

from .transport import Transport, UnixTransport, VirtioTransport
from .wire import DEFAULT_PORT_NAME, LANG_EXT, Args, trace

_VALUE_FLAGS = {"--port-name", "--device", "--unix-connect", "--unix-listen", "--workdir", "--home",
                "--user-name", "--run-as-uid", "--run-as-gid", "--rundir", "--python", "--node", "--shell",
                "--warm", "--spare", "--shutdown-action", "--max-user-processes"}


def _fast_parse(argv: list[str]) -> Args | None:
    """argparse costs milliseconds on the boot path; the common well-formed case needs none of it."""
    args = Args()
    i = 0
    transports = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag == "--no-drop-privileges" and not eq:
            args.no_drop_privileges = True
            i += 1
            continue
        if flag not in _VALUE_FLAGS:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        attr = flag[2:].replace("-", "_")
        if attr in ("port_name", "device", "unix_connect", "unix_listen"):
            transports += 1
        if attr in ("run_as_uid", "run_as_gid", "max_user_processes"):
            if not value.isdigit():
                return None
            setattr(args, attr, int(value))
        elif attr in ("warm", "spare"):
            if value not in LANG_EXT:
                return None
            setattr(args, attr, [*(getattr(args, attr) or []), value])
        elif attr == "shutdown_action" and value not in ("exit", "reboot", "poweroff"):
            return None
        else:
            setattr(args, attr, value)
    return args if transports <= 1 else None


def _argparse(argv: list[str]) -> Args:
    import argparse

    p = argparse.ArgumentParser(prog="sbx-agent", description="exec_sandbox guest agent")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--port-name", default=DEFAULT_PORT_NAME,
                   help=f"virtio-serial port name (default {DEFAULT_PORT_NAME})")
    t.add_argument("--device", help="explicit character device (e.g. /dev/vport0p1)")
    t.add_argument("--unix-connect", metavar="PATH", help="connect to a unix socket server (tests)")
    t.add_argument("--unix-listen", metavar="PATH", help="listen on a unix socket (tests)")
    p.add_argument("--workdir", default="/home/sandbox",
                   help="user code's cwd; file paths are confined to it")
    p.add_argument("--home", default=None, help="HOME for user code (default: the work dir)")
    p.add_argument("--user-name", default="sandbox", help="USER/LOGNAME for user code")
    p.add_argument("--run-as-uid", type=int, default=None, help="uid for user code (default 1000 when root)")
    p.add_argument("--run-as-gid", type=int, default=None, help="gid for user code (default: the uid)")
    p.add_argument("--no-drop-privileges", action="store_true", help="run user code as the agent's user")
    p.add_argument("--max-user-processes", type=int, default=256,
                   help="RLIMIT_NPROC for the sandbox uid (0: no limit; only when dropping privileges)")
    p.add_argument("--rundir", default=None, help="where code files are staged (default /tmp)")
    p.add_argument("--python", default=None, help="python interpreter (default python3 on PATH)")
    p.add_argument("--node", default=None, help="node interpreter (default node/nodejs on PATH)")
    p.add_argument("--shell", default=None, help="shell for raw (default sh, else busybox sh)")
    p.add_argument("--warm", action="append", choices=sorted(LANG_EXT), help="start this REPL at boot")
    p.add_argument("--spare", action="append", choices=sorted(LANG_EXT),
                   help="keep a started interpreter ready for the next one-shot exec (python, javascript)")
    p.add_argument("--shutdown-action", choices=["exit", "reboot", "poweroff"], default=None,
                   help="what 'shutdown' does (default: reboot as PID 1 - use QEMU -no-reboot -, else exit)")
    ns = p.parse_args(argv)
    args = Args()
    for key, value in vars(ns).items():
        setattr(args, key, value)
    return args


def parse_args(argv: list[str]) -> Args:
    args = _fast_parse(argv) or _argparse(argv)
    if args.no_drop_privileges:
        args.run_as_uid = args.run_as_gid = None
    elif args.run_as_uid is None and os.geteuid() == 0:
        args.run_as_uid, args.run_as_gid = 1000, 1000
    if args.run_as_uid is not None and args.run_as_gid is None:
        args.run_as_gid = args.run_as_uid
    if args.shutdown_action is None:
        args.shutdown_action = "reboot" if os.getpid() == 1 else "exit"
    return args


def cmdline_flags(cmdline: str) -> list[str]:
    """Extra agent flags from the kernel command line: ``sbx.agent=--spare=python,--warm=python``.

    The guest init execs the agent with fixed arguments; this lets the host choose per boot.
    """
    flags: list[str] = []
    for token in cmdline.split():
        if token.startswith("sbx.agent="):
            flags += [f for f in token[len("sbx.agent="):].split(",") if f]
    return flags


def main(argv: list[str] | None = None) -> int:
    trace("main")
    if argv is None:
        argv = sys.argv[1:]
        if os.getpid() == 1:
            try:
                with open("/proc/cmdline") as fh:
                    argv = argv + cmdline_flags(fh.read())
            except OSError:
                pass
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    unix_path = args.unix_connect or args.unix_listen
    if unix_path:
        transport: Transport = UnixTransport(unix_path, listen=bool(args.unix_listen))
    else:
        transport = VirtioTransport(args.port_name, args.device)
    trace("transport open")
    from .agent import Agent

    agent = Agent(args)
    if os.getpid() != 1:
        import signal

        # On the host (tests), SIGTERM must not orphan interpreters; PID 1 never gets SIGTERM.
        signal.signal(signal.SIGTERM, lambda _sig, _frame: agent.terminate())
    while True:
        try:
            agent.run(transport)
            return 0
        except Exception as exc:  # as PID 1 the agent must not exit: log and keep serving
            print(f"sbx-agent: main loop error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.1)
