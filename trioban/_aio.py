"""asyncio-flavored workers: ``@worker(flavor="asyncio")`` code runs under trio-asyncio.

The worker's coroutine runs as an asyncio task on a trio-asyncio loop on the same thread;
Trio cancellation (a timeout, a remote cancel, shutdown) cancels that task. An instance opens
the loop once, around its queues, when it runs a queue with such a worker; a job that finds no
loop (its worker was imported later) opens one for itself.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._errors import TriobanError, sole_error

FLAVORS = ("trio", "asyncio")

_INSTALL_HINT = 'asyncio-flavored workers need trio-asyncio: pip install "trioban[asyncio]"'


def check_available() -> None:
    """Raise a clear error if trio-asyncio isn't installed or fails to import on this Python."""
    try:
        import trio_asyncio  # noqa: F401
    except ImportError:
        raise TriobanError(_INSTALL_HINT) from None
    except Exception as exc:  # e.g. a release relying on asyncio APIs this Python removed
        python = "{}.{}".format(*sys.version_info)
        raise TriobanError(
            f"asyncio-flavored workers need trio-asyncio, which fails to import on Python "
            f"{python} ({type(exc).__name__}: {exc}); install a trio-asyncio release that "
            "supports this Python, or make the worker Trio-flavored"
        ) from exc


async def run(function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Await asyncio ``function(*args)`` from Trio, on the current trio-asyncio loop.

    An ``asyncio.CancelledError`` that Trio didn't cause (the code awaited an asyncio task
    cancelled elsewhere) comes out as a ``RuntimeError``: an ordinary failure of the job.
    """
    import asyncio

    import trio_asyncio

    try:
        if trio_asyncio.current_loop.get() is None:
            try:
                async with _open_loop():
                    result = await trio_asyncio.aio_as_trio(_guarded)(function, *args)
            except BaseExceptionGroup as group:  # the loop's nursery wraps the job's error
                raise sole_error(group) from None
        else:
            result = await trio_asyncio.aio_as_trio(_guarded)(function, *args)
    except asyncio.CancelledError as exc:
        # trio-asyncio turns the cancellation Trio asks for into trio.Cancelled, so this one is
        # the code's own; as a BaseException it would pass the executor and stop the node.
        error = RuntimeError(
            "the job's asyncio task was cancelled, not by trioban (did it await an asyncio "
            "task or future cancelled elsewhere?)"
        )
        error.__cause__ = exc
    else:
        if isinstance(result, _Escaped):
            raise result.error  # in Trio: the executor fails the attempt (a SystemExit)
        return result
    await trio.lowlevel.checkpoint_if_cancelled()  # a Trio cancellation pending all the same wins
    raise error


class _Escaped:
    """A ``SystemExit`` or ``KeyboardInterrupt`` raised by asyncio job code, carried out of
    the asyncio task: raised inside it, it would stop the trio-asyncio loop itself."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def _guarded(function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    try:
        return await function(*args)
    except (SystemExit, KeyboardInterrupt) as exc:
        return _Escaped(exc)


@asynccontextmanager
async def loop_if(needed: bool) -> AsyncIterator[None]:
    """A trio-asyncio loop for the block's tasks when ``needed``, else nothing."""
    if not needed:
        yield
        return
    async with _open_loop():
        yield


@asynccontextmanager
async def _open_loop() -> AsyncIterator[None]:
    """A trio-asyncio loop that logs the errors asyncio hands its exception handler (a
    fire-and-forget task that failed, an unclosed aiohttp session) as asyncio's own loop does:
    trio-asyncio's handler raises them into the loop's nursery, stopping the instance."""
    import asyncio

    import trio_asyncio

    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio.BaseEventLoop.default_exception_handler)
        yield
