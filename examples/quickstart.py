"""exec_sandbox quickstart: untrusted Python, JavaScript and shell in throwaway microVMs.

Run after the bootstrap (images built, see README)::

    .venv/bin/python examples/quickstart.py

Every ``scheduler.run`` boots a fresh VM from a fresh disk overlay and destroys it afterwards; a
session keeps one VM (and its interpreter) alive across calls. Under software emulation (TCG) each
boot takes a few seconds, so this whole tour takes well under a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from exec_sandbox import SandboxError, Scheduler, SchedulerConfig

__all__ = ["main"]


def step(title: str) -> None:
    print(f"\n== {title}")


class LivePrinter:
    """An ``on_stdout`` callback: chunks arrive as the guest writes them; print whole lines."""

    def __init__(self) -> None:
        self.pending = ""
        self.started = time.monotonic()

    def __call__(self, chunk: str) -> None:
        *lines, self.pending = (self.pending + chunk).split("\n")
        for line in lines:
            print(f"  [live +{time.monotonic() - self.started:4.1f}s] {line}")


async def main() -> None:
    started = time.monotonic()
    async with Scheduler(SchedulerConfig(default_timeout_seconds=60)) as scheduler:
        step("Python, with stdout streamed as it is produced")
        result = await scheduler.run(
            "import platform, time\n"
            "for i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.5)\n"
            "print('guest kernel:', platform.release())",
            language="python",
            on_stdout=LivePrinter(),
        )
        print(
            f"  exit_code={result.exit_code} accelerator={result.accelerator} "
            f"boot={result.timing.boot_ms:.0f} ms execute={result.timing.execute_ms:.0f} ms "
            f"total={result.timing.total_ms:.0f} ms"
        )

        step("JavaScript (Node.js)")
        result = await scheduler.run(
            "console.log(`node ${process.version}:`, [1, 2, 3].map((x) => x * x))", language="javascript"
        )
        print(f"  stdout: {result.stdout.strip()}  (exit_code={result.exit_code})")

        step("Shell, with an environment variable and a non-zero exit")
        result = await scheduler.run(
            'echo "hello $WHO from $(uname -n)"; exit 3', language="raw", env_vars={"WHO": "quickstart"}
        )
        print(f"  stdout: {result.stdout.strip()}  (exit_code={result.exit_code})")

        step("A runaway loop hits its timeout; the host is unaffected")
        result = await scheduler.run("while True:\n    pass", timeout_seconds=2)
        print(f"  timed_out={result.timed_out} exit_code={result.exit_code}")
        print(f"  stderr: {result.stderr.strip()}")

        step("A session keeps interpreter state and files between calls")
        async with await scheduler.session(language="python") as session:
            await session.exec("import math\nradius = 2")
            area = await session.exec("print(f'area = {math.pi * radius ** 2:.3f}')")
            print(f"  stdout: {area.stdout.strip()}  (exec_count={session.exec_count})")

            payload = os.urandom(256 * 1024)
            await session.write_file("data/input.bin", payload)
            await session.exec(
                "import hashlib, pathlib\n"
                "data = pathlib.Path('data/input.bin').read_bytes()\n"
                "pathlib.Path('data/sha256.txt').write_text(hashlib.sha256(data).hexdigest())\n"
                "pathlib.Path('data/reversed.bin').write_bytes(data[::-1])"
            )
            listing = await session.list_files("data")
            print("  files in the sandbox:", ", ".join(f"{f.name} ({f.size} B)" for f in listing))
            guest_digest = (await session.read_file("data/sha256.txt") or b"").decode()
            reversed_back = await session.read_file("data/reversed.bin") or b""
            ok = guest_digest == hashlib.sha256(payload).hexdigest() and reversed_back == payload[::-1]
            print(f"  round trip of {len(payload)} bytes: sha256 {'matches' if ok else 'DIFFERS'}")
            if not ok:
                raise SystemExit("file round trip failed")
    print(f"\ndone in {time.monotonic() - started:.1f} s; every VM is gone.")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except SandboxError as exc:
        raise SystemExit(f"{type(exc).__name__}: {exc}") from None
