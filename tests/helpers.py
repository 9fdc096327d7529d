"""Small helpers for tests that wait on effects in other tasks or processes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def eventually(check: Callable[[], Awaitable[bool]], *, interval: float = 0.02) -> None:
    """Wait until ``check()`` is true. For effects in other processes or sent over the notifier,
    which no in-process event signals; callers bound it with ``trio.fail_after``."""
    while True:
        if await check():
            return
        await trio.sleep(interval)
