"""The one way user callbacks are called: sync or async, and never allowed to break the caller.

Output streams (``on_stdout`` / ``on_stderr``) and boot logs (``on_boot_log``) accept a plain
function or a coroutine function. :func:`call_safely` calls it, awaits the result when there is one,
and logs (then swallows) what it raises; ``CancelledError`` always propagates.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

__all__ = ["TextCallback", "call_safely"]

#: A callback given text: ``on_stdout``, ``on_stderr``, ``on_boot_log``.
TextCallback = Callable[[str], Awaitable[None] | None]


async def call_safely(
    callback: TextCallback, data: str, *, what: str, logger: logging.Logger, failures: list[int] | None = None
) -> None:
    """Call ``callback(data)``; a failure is logged as "<what> callback failed" and swallowed.

    ``failures``: a one-element counter shared by the calls of one exec; only the first failure
    is logged with its traceback, the others are counted (a guest sets the pace of output calls).
    """
    try:
        result = callback(data)
        if inspect.isawaitable(result):
            await result
    except Exception:
        if failures is None:
            logger.exception("%s callback failed; continuing", what)
            return
        failures[0] += 1
        if failures[0] == 1:
            logger.exception("%s callback failed; continuing (further failures are counted)", what)
