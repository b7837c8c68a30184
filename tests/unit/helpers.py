"""What the unit tests share: image bytes, instance ids, and turns of the event loop."""

from __future__ import annotations

import asyncio
import random
import uuid


def image(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of an image, the same for the same seed."""
    return random.Random(seed).randbytes(size)


def instance() -> str:
    return str(uuid.uuid4())


async def turns(rounds: int = 5) -> None:
    """Let every other task run on until it waits on something else than the event loop or
    its worker thread: ``rounds`` rounds, each of a few turns of the loop, then a trip through
    the loop's one worker thread (see conftest), which returns only after every thread job
    submitted before it, and after its result has reached the task that waits on it.

    In each round, a task whose next thread job is due within ``_TURNS`` loop turns submits it
    before this round's trip, so it gets at least one job further. A second cache takes three
    jobs to reach the image's lock (measured: one round suffices, none does not); the default
    leaves room. Loop turns and the thread's order, never time."""
    for _ in range(rounds):
        for _ in range(_TURNS):
            await asyncio.sleep(0)
        await asyncio.to_thread(lambda: None)


_TURNS = 5  # more loop turns than the cache's calls take between two thread jobs
