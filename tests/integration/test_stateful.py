"""A stateful property test: deploys, cancelled waiters, injected faults and removals in any
order, against a simple model, with the real Glance behind the fault proxy.

After every step: every instance disk matches its image, every cache disk matches its image and
is the only thing the index calls ready, nothing partial or temporary is visible, and no lock
is held (every lock file can be taken at once) or kept for an image that is not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pvmcache_async import (
    DeployResult,
    EntryState,
    GlanceClient,
    GlanceError,
    ImageCache,
    ImageNotFound,
    IntegrityError,
    Outcome,
)
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.locks import FileLock
from pvmcache_async.storage.filevg import FileVG
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import Fault, FaultProxy, answer, cut, flip, stall
from ..support import disk_image, vg_files

KiB = 1 << 10
RETRY = RetryPolicy(retries=3, backoff=0.001, max_backoff=0.005)


@dataclass(frozen=True)
class Injected:
    name: str
    faults: tuple[Fault, ...]
    error: type[Exception] | None  # what every deploy that shares the download gets


def _faults(size: int) -> list[Injected]:
    return [
        Injected("none", (), None),
        Injected("cut", (cut(after=size // 2),), None),
        Injected("stall", (stall(after=size // 3),), None),
        Injected("503", (answer(503),), None),
        Injected("flip", (flip(at=size - 5),), IntegrityError),
        Injected("503-forever", (answer(503),) * (RETRY.retries + 1), GlanceError),
        Injected("404", (answer(404),), ImageNotFound),
    ]


class CacheMachine(RuleBasedStateMachine):
    images: ClassVar[dict[str, bytes]] = {}  # set by the test: two image ids -> data
    glance_url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="pvmcache-stateful-"))
        self.vg = self.dir / "vg"
        self.proxy = self._run(FaultProxy(self.glance_url).start())
        # a stall ends once the step has made its cancellations (``_deploys``), not by the
        # client's read timeout: that is only a safety net
        client = GlanceClient(self.proxy.url, chunk_size=16 * KiB, read_timeout=60, retry=RETRY)
        self.cache = self._run(self._open(client))
        self.cached: set[str] = set()  # the model: images in the cache
        self.disks: dict[str, str] = {}  # the model: instance disk -> image

    async def _open(self, client: GlanceClient) -> ImageCache:
        return ImageCache(FileVG(self.vg), client)

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self._run(self.cache.close())
        self._run(self.proxy.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        which=st.integers(0, 1),
        n=st.integers(1, 4),
        fault=st.integers(0, 6),
        cancelled=st.integers(0, 3),
        cancel_after=st.integers(0, 300),  # event loop turns before the cancellations
    )
    def deploy(self, which: int, n: int, fault: int, cancelled: int, cancel_after: int) -> None:
        image = sorted(self.images)[which]
        injected = _faults(len(self.images[image]))[fault]
        was_cached = image in self.cached
        self.proxy.plan(image, *injected.faults)
        results = self._run(self._deploys(image, n, min(cancelled, n), cancel_after))
        self.proxy.clear()  # a fault the step never met must not hit a later one
        self.proxy.rearm_stalls()  # every download has ended: none is stalled now

        for outcome, was_cancelled in results:
            if isinstance(outcome, DeployResult):
                assert was_cached or injected.error is None, (injected, outcome)
                assert outcome.outcome is Outcome.HIT or not was_cached
                self.disks[outcome.disk] = image
            elif isinstance(outcome, asyncio.CancelledError):
                assert was_cancelled
            else:
                assert not was_cached and injected.error is not None, (injected, outcome)
                assert isinstance(outcome, injected.error), (injected, outcome)
                assert image in str(outcome)
        if any(isinstance(o, DeployResult) for o, _ in results):
            self.cached.add(image)
        elif injected.error is None and not all(c for _, c in results):
            raise AssertionError(f"no deploy succeeded under fault {injected.name}: {results}")
        if injected.error is None and any(not c for _, c in results):
            assert image in self.cached
        # a download whose waiters were all cancelled still ends: it may have cached the image
        if any((self.vg / e.cache_disk).exists() for e in self._entries() if e.image_id == image):
            assert was_cached or injected.error is None
            self.cached.add(image)

    async def _deploys(
        self, image: str, n: int, cancelled: int, cancel_after: int
    ) -> list[tuple[object, bool]]:
        tasks = [asyncio.create_task(self.cache.deploy(image, str(uuid.uuid4()))) for _ in range(n)]
        for _ in range(cancel_after):
            await asyncio.sleep(0)
        for task in tasks[:cancelled]:
            task.cancel()
        # a stall holds the download until now, so the cancellations land while it is under
        # way; then its connection drops, as the client's read timeout would drop it, and the
        # download resumes (a stall that begins later drops at once)
        self.proxy.drop_stalls()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        # a download whose waiters were all cancelled runs on: let it end before the checks
        await self.cache.settle()
        return [(o, i < cancelled) for i, o in enumerate(outcomes)]

    @rule(which=st.integers(0, 1))
    def remove(self, which: int) -> None:
        image = sorted(self.images)[which]
        removed = self._run(self.cache.remove(image))
        assert removed == (image in self.cached)
        self.cached.discard(image)

    @rule(max_count=st.integers(0, 2))
    def prune(self, max_count: int) -> None:
        before = {e.cache_disk: e.image_id for e in self._entries()}
        result = self._run(self.cache.prune(max_count=max_count))
        assert len(result.kept) <= max_count
        assert set(result.removed) | set(result.kept) == set(before)
        self.cached -= {before[d] for d in result.removed}

    def _entries(self) -> list[Any]:
        return self._run(self.cache.entries())  # type: ignore[no-any-return]

    @invariant()
    def every_disk_is_whole_and_nothing_partial_is_visible(self) -> None:
        files = vg_files(self.vg)
        entries = self._entries()
        assert all(e.state is EntryState.READY for e in entries), entries
        assert {e.image_id for e in entries} == self.cached
        assert sorted(files) == sorted([e.cache_disk for e in entries] + list(self.disks))
        for e in entries:
            assert _sha(self.vg / e.cache_disk) == _sha_of(self.images[e.image_id])
        for disk, image in self.disks.items():
            assert _sha(self.vg / disk) == _sha_of(self.images[image])

    @invariant()
    def no_lock_is_held_or_left_for_an_uncached_image(self) -> None:
        locks = sorted((self.vg / ".pvmcache" / "locks").glob("*.lock"))
        assert {p.name.removesuffix(".lock") for p in locks} <= self.cached
        for path in locks:
            lock = FileLock(path)
            assert lock.try_acquire(), f"{path.name} is held after every step ended"
            lock.release()


def _sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _sha_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_the_cache_keeps_its_promises_under_any_interleaving(glance_server: GlanceServer) -> None:
    data = [disk_image(size, seed=70 + i) for i, size in enumerate((160 * KiB, 224 * KiB))]
    images = {glance_server.create_image(d): d for d in data}

    CacheMachine.images = images
    CacheMachine.glance_url = glance_server.url
    run_state_machine_as_test(
        CacheMachine,
        settings=settings(
            max_examples=12,
            stateful_step_count=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
