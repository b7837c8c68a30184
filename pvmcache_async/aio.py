"""Event loop helpers: the loop to run (uvloop when installed), and work that cancellation
must not cut short (``finish``, ``complete_or_undo``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop (uvloop when available)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def complete_or_undo(
    work: Coroutine[Any, Any, T], undo: Callable[[], Coroutine[Any, Any, Any]]
) -> T:
    """Await ``work``; if the caller is cancelled meanwhile, let it end, undo it, re-raise.

    For work that runs on in a thread whatever the caller does (a clone): the caller returns
    only once it is over, and a cancelled caller leaves nothing of it behind.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            await finish(undo())
        raise


async def finish(cleanup: Coroutine[Any, Any, Any]) -> None:
    """Run clean-up to its end even if the task is cancelled again meanwhile."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
