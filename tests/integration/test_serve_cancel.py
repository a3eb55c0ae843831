"""A command killed right after its start event is killed in the guest, however young (the kill may
overtake the run in the guest agent, which remembers it). Checked in the guest's own process table,
not just by the server's bookkeeping."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from e2b import CommandExitException, Sandbox

from tests.integration.serve_server import KEY_A, RunningServer, running_server, sdk_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Lists the guest's processes whose command line starts with "sleep 61" (the pattern cannot match
# the listing's own shell or grep).
_COUNT = (
    "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"
    " | grep -c '^sleep 6[1]' || true"
)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server() as srv, sdk_env(srv.url, KEY_A):
        yield srv


def _wait_no_sleepers(sbx: Sandbox) -> None:
    deadline = time.monotonic() + 20
    while (count := sbx.commands.run(_COUNT).stdout.strip()) != "0":
        assert time.monotonic() < deadline, f"{count} 'sleep 61' still running in the guest"
        time.sleep(0.2)


def test_an_early_kill_stops_the_command_in_the_guest(server: RunningServer) -> None:
    sbx = Sandbox.create()
    try:
        assert sbx.commands.run(_COUNT).stdout.strip() == "0"
        for _ in range(5):
            handle = sbx.commands.run("sleep 61", background=True)
            assert sbx.commands.kill(handle.pid) is True
            with pytest.raises(CommandExitException):
                handle.wait()
        _wait_no_sleepers(sbx)
    finally:
        sbx.kill()
