"""envd's directory watches (inotify in the guest agent) through the unmodified ``e2b`` SDK: the
sync SDK's polled watcher and the async SDK's WatchDir stream, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import pytest
from e2b import AsyncSandbox, FilesystemEvent, FilesystemEventType, NotFoundException, Sandbox

from tests.integration.serve_server import key_a_env, serve_module  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SCRIPT = "mkdir -p w/sub && echo a > w/f && chmod 600 w/f && mv w/f w/g && echo b > w/sub/in && rm w/g"
WANTED = {
    ("f", FilesystemEventType.CREATE), ("f", FilesystemEventType.WRITE), ("f", FilesystemEventType.CHMOD),
    ("f", FilesystemEventType.RENAME), ("g", FilesystemEventType.CREATE), ("g", FilesystemEventType.REMOVE),
    ("sub", FilesystemEventType.CREATE), ("sub/in", FilesystemEventType.CREATE),
}


@pytest.mark.usefixtures("key_a_env")
def test_sync_watcher_polls_events() -> None:
    sbx = Sandbox.create()
    try:
        sbx.files.make_dir("w")
        handle = sbx.files.watch_dir("w", recursive=True)
        sbx.commands.run(SCRIPT)
        seen: set[tuple[str, FilesystemEventType]] = set()
        deadline = time.monotonic() + 30
        while not seen >= WANTED and time.monotonic() < deadline:
            seen |= {(e.name, e.type) for e in handle.get_new_events()}
            time.sleep(0.2)
        assert seen >= WANTED, WANTED - seen
        handle.stop()
        with pytest.raises(NotFoundException):
            sbx.files.watch_dir("no-such-dir")
    finally:
        sbx.kill()


@pytest.mark.usefixtures("key_a_env")
def test_async_watch_dir_streams_events() -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.create()
        try:
            await sbx.files.make_dir("w")
            events: list[FilesystemEvent] = []
            got_all = asyncio.Event()

            def on_event(e: FilesystemEvent) -> None:
                events.append(e)
                if {(x.name, x.type) for x in events} >= WANTED:
                    got_all.set()

            handle = await sbx.files.watch_dir("w", on_event=on_event, recursive=True)
            await sbx.commands.run(SCRIPT)
            await asyncio.wait_for(got_all.wait(), 30)
            await handle.stop()
            count = len(events)
            await sbx.commands.run("echo later > w/after")
            await asyncio.sleep(1.0)
            assert len(events) == count  # stopped: nothing more arrives
        finally:
            await sbx.kill()

    asyncio.run(scenario())
