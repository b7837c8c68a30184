"""The unit layer's fixtures: a memory VG, a scripted Glance and a cache on both.

Also records which nova modules the layer imports (``layer``): nothing here may import nova.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pvmcache_async import CacheSettings, ImageCache
from pvmcache_async.storage.memory import MemoryVG

from . import layer
from .scripted_glance import ScriptedGlance

layer.imported |= layer.nova_modules() - layer.at_start
_collecting: dict[str, frozenset[str]] = {}


def pytest_collectstart(collector: pytest.Collector) -> None:
    if isinstance(collector, pytest.Module):
        before = frozenset(layer.nova_modules())
        layer.preloaded |= before
        _collecting[collector.nodeid] = before


def pytest_collectreport(report: pytest.CollectReport) -> None:
    before = _collecting.pop(report.nodeid, None)
    if before is not None:
        layer.imported |= layer.nova_modules() - before


@pytest.fixture(autouse=True)
async def one_worker_thread() -> None:
    """The loop's threads (the index, ``asyncio.to_thread``) are one: jobs run in the order
    they were submitted, so a test's interleaving is the same on every run (``helpers.turns``)."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))


@pytest.fixture
def vg(tmp_path: Path) -> MemoryVG:
    return MemoryVG(tmp_path / "state")


@pytest.fixture
def glance() -> ScriptedGlance:
    return ScriptedGlance()


@pytest.fixture
async def cache(vg: MemoryVG, glance: ScriptedGlance) -> AsyncIterator[ImageCache]:
    c = ImageCache(vg, glance, CacheSettings(lock_poll=0.001))  # a GlanceClient, duck-typed
    yield c
    await c.close()


class Clock:
    """The wall clock the cache reads (``time.time``), moved only by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Stops the wall clock at a fixed time: last uses and ages are what the test makes them."""
    clock = Clock(1_800_000_000.0)
    monkeypatch.setattr("time.time", clock.time)
    return clock
