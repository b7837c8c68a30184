"""The bridge from an asyncio download to pypowervm's blocking upload: a bounded byte pipe.

The PowerVM backend's upload runs in a thread that reads a file-like object; the download
writes from the event loop. :class:`StreamBuffer` joins the two in bounded memory, and carries
a failure either way (an aborted download to the reader, a failed upload to the writer).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading

from pvmcache_async.errors import InvalidInput, StorageError


class StreamBuffer:
    """A bounded byte pipe from the event loop (one writer) to one reading thread.

    ``put`` (on the loop) waits while ``limit`` bytes are buffered; ``read`` (in the thread)
    blocks while nothing is. A chunk larger than ``limit`` is taken when the buffer is empty,
    so at most ``max(limit, largest chunk)`` bytes are ever held. ``abort`` makes the reader's
    next ``read`` raise; ``reader_failed`` makes the writer's next ``put`` raise.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise InvalidInput("the upload buffer must hold at least one byte")
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._cond = threading.Condition()
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._aborted: str | None = None
        self._reader_error: BaseException | None = None
        self._room = asyncio.Event()
        self.bytes_written = 0
        self.bytes_read = 0
        self.high_water = 0  # the most bytes ever buffered at once

    @property
    def buffered(self) -> int:
        return self._buffered

    async def put(self, chunk: bytes) -> None:
        """Queue ``chunk`` for the reader; wait while the buffer is full."""
        if not chunk:
            return
        while True:
            with self._cond:
                self._check_writable()
                if self._buffered == 0 or self._buffered + len(chunk) <= self.limit:
                    self._chunks.append(memoryview(chunk))
                    self._buffered += len(chunk)
                    self.bytes_written += len(chunk)
                    self.high_water = max(self.high_water, self._buffered)
                    self._cond.notify_all()
                    return
                self._room.clear()  # under the lock: a read after this sets it again
            await self._room.wait()

    def _check_writable(self) -> None:
        if self._reader_error is not None:
            cause = str(self._reader_error) or type(self._reader_error).__name__
            raise StorageError(f"the upload to PowerVM failed: {' '.join(cause.split())}")
        if self._aborted is not None:
            raise StorageError(f"the upload to PowerVM was stopped: {self._aborted}")
        if self._eof:
            raise StorageError("the upload stream is already closed")

    def close(self) -> None:
        """End of stream: the reader gets ``b""`` once the buffer is drained."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abort(self, reason: str) -> None:
        """Stop the reader: its next (or current) ``read`` raises; buffered data is dropped."""
        with self._cond:
            if self._aborted is None:
                self._aborted = reason
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify_all()
        self._wake_writer()

    def reader_failed(self, exc: BaseException) -> None:
        """Called from the reading thread when the upload failed: the writer stops."""
        with self._cond:
            self._reader_error = exc
            self._chunks.clear()
            self._buffered = 0
        self._wake_writer()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all buffered ones if negative); ``b""`` at the end of stream."""
        with self._cond:
            while not self._chunks and not self._eof and self._aborted is None:
                self._cond.wait()
            if self._aborted is not None:
                raise OSError(f"upload stream aborted: {self._aborted}")
            if not self._chunks:
                return b""
            parts: list[bytes] = []
            want = size if size >= 0 else self._buffered
            while self._chunks and want > 0:
                head = self._chunks[0]
                take = head[:want]
                parts.append(bytes(take))
                want -= len(take)
                if len(take) == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[len(take) :]
            data = b"".join(parts)
            self._buffered -= len(data)
            self.bytes_read += len(data)
        self._wake_writer()
        return data

    def _wake_writer(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._room.set)
