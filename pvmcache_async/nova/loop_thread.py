"""One asyncio (uvloop) event loop in a dedicated OS thread, callable from any other thread.

nova-compute calls its driver from many native threads; the cache is asyncio and must live in
one loop (its singleflight and semaphores are per loop). ``LoopThread`` starts that loop lazily
on the first call, runs each coroutine there with ``asyncio.run_coroutine_threadsafe`` and
blocks the calling thread until the result is ready. ``stop`` ends it cleanly: a last
coroutine (closing the cache) runs, the loop's tasks and executor are shut down, the thread
is joined, and a later call starts a new loop.

In an eventlet-monkey-patched process (nova's deprecated ``concurrency_backend = eventlet``) a
green thread blocking on a native thread's result would stall the hub, and ``threading`` is
green there: ``LoopThread`` refuses with a clear message instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pvmcache_async import aio
from pvmcache_async.errors import CacheError

T = TypeVar("T")


def eventlet_patched() -> bool:
    """True when eventlet has monkey-patched ``thread`` in this process."""
    eventlet = sys.modules.get("eventlet.patcher")
    if eventlet is None:
        return False
    return bool(eventlet.is_monkey_patched("thread"))


class LoopThread:
    """A lazily started event loop in its own daemon thread."""

    def __init__(self, name: str = "pvmcache-loop", *, executor_workers: int = 32) -> None:
        self.name = name
        self._executor_workers = executor_workers
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> asyncio.AbstractEventLoop:
        """Start the loop thread unless it runs; return its loop."""
        with self._lock:
            if self._loop is not None:
                return self._loop
            if eventlet_patched():
                raise CacheError(
                    "the image cache needs native threads, but nova-compute runs with eventlet "
                    "monkey-patching; set [DEFAULT] concurrency_backend = threading"
                )
            loop = aio.loop_factory()()
            # its own pool: blocking calls of the cache (clones, index) never queue behind
            # another library's work in a small shared default pool
            loop.set_default_executor(
                concurrent.futures.ThreadPoolExecutor(
                    self._executor_workers, thread_name_prefix=f"{self.name}-io"
                )
            )
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name=self.name, daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread = loop, thread
            return loop

    def call(self, work: Callable[[], Coroutine[Any, Any, T]], *, image_id: str | None = None) -> T:
        """Run ``work()`` on the loop and return its result in the calling thread.

        If the calling thread is interrupted while waiting, the coroutine is cancelled. If
        ``stop`` cancels it, the caller gets a CacheError saying so (naming ``image_id``),
        never a cancellation: nova's threads catch ``Exception``, and a bare
        ``CancelledError`` would tell nova's log and the instance's fault nothing.
        """
        loop = self.start()
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.call from its own loop would deadlock")
        future = asyncio.run_coroutine_threadsafe(work(), loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:  # only stop cancels what runs on the loop
            raise CacheError(
                "the image cache was closed before this call ended", image_id=image_id
            ) from None
        except BaseException:
            future.cancel()
            raise

    def stop(self, last: Callable[[], Awaitable[object]] | None = None) -> None:
        """Run ``last`` (if given) on the loop, then stop the loop and join its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def finish() -> None:
            try:
                if last is not None:
                    await last()
            finally:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(finish(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
