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


async def turns(rounds: int = 10) -> None:
    """Let every other task run on until it waits on something else than the event loop or
    its worker thread: ``rounds`` turns of the loop, each ending with a trip through the
    loop's one worker thread (see conftest), which returns only after every thread job
    submitted before it. A caller of the cache joins a download within three such rounds.

    Loop turns, not time: with one worker thread the order is the same on every run."""
    for _ in range(rounds):
        await asyncio.sleep(0)
        await asyncio.to_thread(lambda: None)
