"""SingleFlight, SharedRead and FileLock behave as their docstrings promise, cancellation
included."""

from __future__ import annotations

import asyncio
import fcntl
import sys
from pathlib import Path

import pytest

from pvmcache_async.errors import UntrustedFile
from pvmcache_async.locks import FileLock, OwnerLocks, SharedRead, SingleFlight

from ..support import PLANTED, plant


async def test_concurrent_calls_for_one_key_share_one_execution() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 7

    waiters = [asyncio.create_task(flights.do("k", work)) for _ in range(100)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1
    assert [v for v, _ in results] == [7] * 100
    assert sum(leader for _, leader in results) == 1
    assert not flights.in_flight("k")


async def test_an_error_reaches_every_waiter_and_is_not_remembered() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    attempts = 0

    async def failing() -> int:
        nonlocal attempts
        attempts += 1
        await release.wait()
        raise OSError("boom")

    waiters = [asyncio.create_task(flights.do("k", failing)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)

    async def ok() -> int:
        return 1

    assert await flights.do("k", ok) == (1, True)
    assert attempts == 1


async def test_cancelling_waiters_does_not_cancel_the_shared_work() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "done"

    leader = asyncio.create_task(flights.do("k", work))
    others = [asyncio.create_task(flights.do("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    others[0].cancel()
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*others[1:]) == [("done", False)] * 4
    assert leader.cancelled() and others[0].cancelled()


async def test_work_outlives_all_its_callers_and_then_the_key_is_free() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    release, finished = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        await release.wait()
        finished.set()
        return "done"

    caller = asyncio.create_task(flights.do("k", work))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    assert flights.in_flight("k")
    release.set()
    await finished.wait()
    await asyncio.sleep(0)
    assert not flights.in_flight("k")


async def test_cancel_all_cancels_the_work() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()
        return "never"

    caller = asyncio.create_task(flights.do("k", work))
    await started.wait()
    await flights.cancel_all()
    assert cleaned.is_set()
    with pytest.raises(asyncio.CancelledError):
        await caller


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


async def test_file_lock_excludes_another_process_and_dies_with_it(tmp_path: Path) -> None:
    path = tmp_path / "img.lock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(path), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"locked\n"
        assert not FileLock(path).try_acquire()
        assert not FileLock(path, shared=True).try_acquire()
        proc.kill()  # the kernel drops a dead holder's lock
        await proc.wait()
        lock = FileLock(path)
        await asyncio.wait_for(lock.acquire(), 10)
        assert lock.held
        lock.release()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_shared_holders_coexist_and_exclude_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "img.lock"
    a, b = FileLock(path, shared=True), FileLock(path, shared=True)
    assert a.try_acquire() and b.try_acquire()
    writer = FileLock(path)
    assert not writer.try_acquire()
    a.release()
    assert not writer.try_acquire()
    b.release()
    assert writer.try_acquire()
    writer.release()


class WatchedLock(FileLock):
    """A FileLock that says when a try found the lock taken (``refused``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, poll=60.0)  # after a refusal, it waits a long poll: cancel it there
        self.refused = asyncio.Event()

    def try_acquire(self) -> bool:
        got = super().try_acquire()
        if not got:
            self.refused.set()
        return got


async def test_cancelled_acquire_holds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "img.lock"
    holder = FileLock(path)
    assert holder.try_acquire()
    waiter = WatchedLock(path)
    task = asyncio.create_task(waiter.acquire())
    await waiter.refused.wait()  # it tried, found the lock held, and now waits to try again
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not waiter.held
    holder.release()
    assert FileLock(path).try_acquire()


def test_a_lock_file_removed_between_open_and_flock_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "img.lock"
    real_flock = fcntl.flock
    flocks = 0

    def flock(fd: int, operation: int) -> None:
        nonlocal flocks
        if flocks == 0:  # another process removes the lock file after our open, before flock
            path.unlink()
        flocks += 1
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = FileLock(path)
    assert lock.try_acquire()
    monkeypatch.undo()
    assert flocks == 2  # the removed file was locked, noticed, and the lock taken again
    assert not FileLock(path).try_acquire()  # it holds the file now at the path
    lock.release()
    assert FileLock(path).try_acquire()


@pytest.mark.parametrize("kind", PLANTED)
def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path, target = tmp_path / "img.lock", tmp_path / "target"
    plant(path, kind, target)
    with pytest.raises(UntrustedFile, match=f"lock file {path} is"):
        FileLock(path).try_acquire()
    assert not target.exists()  # nothing created through a link


def test_owner_locks_skip_what_was_planted_among_them_and_find_the_dead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the PowerVM VG's owner locks: one planted file must not hide the others, nor fail
    owners = OwnerLocks(tmp_path)
    live = owners.own("p_live000000000")
    (tmp_path / "p_dead000000000.lock").touch()  # its writer died: nobody holds it
    planted = [tmp_path / f"p_{kind[:4]}000000000.lock" for kind in PLANTED]
    for path, kind in zip(planted, PLANTED, strict=True):
        plant(path, kind, tmp_path / "target")

    dead = owners.dead(["p_live000000000", "p_syml000000000"], ("p_",))

    assert [OwnerLocks.name_of(o) for o in dead] == ["p_dead000000000"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [sum(str(p) in w for w in warnings) for p in planted] == [1, 1, 1], warnings
    for owner in dead:
        OwnerLocks.disown(owner)
    OwnerLocks.disown(live)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in planted)


class _Source:
    """A slow source whose reads the test lets through one at a time; each read returns the
    version the source had when that read began."""

    def __init__(self) -> None:
        self.version = 0
        self.reads = 0
        self.gate = asyncio.Semaphore(0)
        self.fail: Exception | None = None
        self.began: asyncio.Queue[int] = asyncio.Queue()  # the version each read saw

    async def read(self) -> int:
        self.reads += 1
        seen = self.version
        self.began.put_nowait(seen)
        await self.gate.acquire()
        if self.fail is not None:
            raise self.fail
        return seen


async def test_shared_read_serves_concurrent_callers_with_one_read() -> None:
    source = _Source()
    read = SharedRead(source.read)
    callers = [asyncio.create_task(read()) for _ in range(50)]
    await asyncio.sleep(0)
    source.gate.release()
    assert await asyncio.gather(*callers) == [0] * 50
    assert source.reads == 1


async def test_shared_read_never_hands_out_a_read_begun_before_the_call() -> None:
    source = _Source()
    read = SharedRead(source.read)
    early = asyncio.create_task(read())
    assert await source.began.get() == 0  # the first read is under way
    source.version = 1  # e.g. this caller has just made a disk
    late = [asyncio.create_task(read()) for _ in range(10)]
    await asyncio.sleep(0)
    source.gate.release()
    assert await early == 0
    assert await source.began.get() == 1  # one more read, for everyone who asked meanwhile
    source.gate.release()
    assert await asyncio.gather(*late) == [1] * 10
    assert source.reads == 2


async def test_shared_read_error_reaches_its_callers_only_and_is_not_remembered() -> None:
    source = _Source()
    read = SharedRead(source.read)
    source.fail = OSError("the REST API is down")
    failing = [asyncio.create_task(read()) for _ in range(5)]
    await asyncio.sleep(0)
    source.gate.release()
    for task in failing:
        with pytest.raises(OSError, match="down"):
            await task
    source.fail = None
    source.version = 3
    source.gate.release()
    assert await read() == 3


async def test_a_cancelled_caller_leaves_and_the_shared_read_goes_on() -> None:
    source = _Source()
    read = SharedRead(source.read)
    leaving, staying = asyncio.create_task(read()), asyncio.create_task(read())
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    source.gate.release()
    assert await staying == 0
    assert source.reads == 1
