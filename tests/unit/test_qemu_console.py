"""Console ring buffer: bounded tail, line fan-out, waiting for markers."""

from __future__ import annotations

import asyncio

import pytest

from smartvm.qemu.console import ConsoleBuffer


async def test_keeps_only_the_tail() -> None:
    console = ConsoleBuffer(limit=16)
    console.feed(b"0123456789")
    console.feed(b"abcdefghij\n")
    assert console.output() == "56789abcdefghij\n"
    assert console.total_bytes == 21


async def test_lines_across_chunks_and_close() -> None:
    console = ConsoleBuffer()
    seen: list[str] = []

    async def collect() -> None:
        async for line in console.lines():
            seen.append(line)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0)
    console.feed(b"hel")
    console.feed(b"lo\r\nwor")
    console.feed(b"ld\n\xffpartial")
    console.close()
    await task
    assert seen == ["hello", "world"]


async def test_reader_attach_and_wait_for() -> None:
    reader = asyncio.StreamReader()
    console = ConsoleBuffer()
    console.attach(reader)
    waiter = asyncio.create_task(console.wait_for(r"COUNT (\d+)"))
    reader.feed_data(b"boot...\n")
    await asyncio.sleep(0)
    assert not waiter.done()
    reader.feed_data(b"COUNT 42\n")
    match = await waiter
    assert match.group(1) == "42"
    # `since` skips output that was already there
    offset = console.total_bytes
    later = asyncio.create_task(console.wait_for(r"COUNT (\d+)", since=offset))
    reader.feed_data(b"COUNT 43\n")
    assert (await later).group(1) == "43"
    reader.feed_eof()
    assert await console.wait_eof(timeout=5)
    with pytest.raises(EOFError):
        await console.wait_for("never")
    await console.aclose()


def test_rejects_bad_limit() -> None:
    with pytest.raises(ValueError):
        ConsoleBuffer(limit=0)
