"""Progress of downloads, seen from the process that fills an image and from any other.

The process that downloads an image keeps a ``Meter`` of it (``ProgressBoard.meter``): bytes
written, a rate over the last few seconds, its pid and start. Other processes on the same VG
read it from a small JSON file, ``<state_dir>/progress/<image id>.json``, which the meter
replaces atomically at most ``RECORD_INTERVAL`` apart (never once per chunk) and removes when
the download ends. A writer that died leaves its file behind: ``writer_alive`` tells a live
download from a dead one by the pid and that process's start time (a reused pid is not alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import InvalidInput
from .glance import Sink
from .names import validate_image_id

__all__ = [
    "RECORD_INTERVAL",
    "Meter",
    "ProgressBoard",
    "ProgressRecord",
    "read_record",
    "writer_alive",
]

RECORD_INTERVAL = 0.25  # seconds between two writes of a record file
_RATE_WINDOW = 5.0  # seconds of samples the rate is taken over


@dataclass(frozen=True, slots=True)
class ProgressRecord:
    """Where one download stands: what its writer last recorded."""

    image_id: str
    done: int  # bytes in the partial disk (back to 0 if the download starts over)
    total: int  # the image's size
    rate: float  # bytes per second over the last few seconds
    pid: int  # the writer
    pid_start: int | None  # the writer's start time (clock ticks after boot), None if unknown
    started: float  # unix time the download began
    updated: float  # unix time of this record

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None when nothing moves."""
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def as_json(self) -> dict[str, object]:
        """What a reader is told: the bytes, the rate, the time left and the writer's pid."""
        return {
            "done": self.done,
            "total": self.total,
            "rate": round(self.rate),
            "eta": None if self.eta is None else round(self.eta, 1),
            "writer_pid": self.pid,
        }


def _process_start(pid: int) -> int | None:
    """The start time of a process (field 22 of /proc/PID/stat), None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return int(stat.rpartition(")")[2].split()[19])


def writer_alive(record: ProgressRecord) -> bool:
    """Whether the process that wrote ``record`` is still running (not a reuse of its pid)."""
    if record.pid_start is not None and Path("/proc/self/stat").exists():
        return _process_start(record.pid) == record.pid_start
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _record_path(state_dir: Path, image_id: str) -> Path:
    return state_dir / "progress" / f"{validate_image_id(image_id)}.json"


def read_record(state_dir: Path, image_id: str) -> ProgressRecord | None:
    """The last record of the image's download, by any process; None if there is none."""
    try:
        raw = json.loads(_record_path(state_dir, image_id).read_text())
        record = ProgressRecord(**raw)
    except (OSError, ValueError, TypeError, InvalidInput):
        return None  # none, or not one of ours: nothing to show
    return record if record.image_id == image_id else None


def discard_record(state_dir: Path, image_id: str) -> None:
    """Remove the image's record and any writer's temporary (a dead writer's, found under the
    image's lock)."""
    path = _record_path(state_dir, image_id)
    for leftover in [path, *path.parent.glob(f".{image_id}.*.tmp")]:
        leftover.unlink(missing_ok=True)


class Meter:
    """The progress of one download in this process; ``ProgressBoard.meter`` makes one.

    The download only counts (``moved``); a task of the meter's own writes the record file
    every ``RECORD_INTERVAL`` while it changes, so a stalled download's last bytes are on
    record too, and a fast one costs no file write per chunk.
    """

    def __init__(self, state_dir: Path, image_id: str, total: int) -> None:
        self._path = _record_path(state_dir, image_id)
        self._tmp = self._path.with_name(f".{image_id}.{os.getpid()}.tmp")  # this writer's own
        now = time.time()
        self._record = ProgressRecord(
            image_id, 0, total, 0.0, os.getpid(), _process_start(os.getpid()), now, now
        )
        self._done = 0
        # (monotonic time, bytes): the moves of the last _RATE_WINDOW seconds, and one before
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self._closing = threading.Lock()
        self._closed = False

    def sink(self, inner: Sink) -> Sink:
        """``inner``, counted by this meter."""
        return _Metered(inner, self)

    def moved(self, done: int) -> None:
        """The download now holds ``done`` bytes (fewer than before: it started over)."""
        now = time.monotonic()
        if done < self._done:  # the old samples say nothing of the new rate
            self._samples.clear()
        self._done = done
        self._samples.append((now, done))
        while len(self._samples) > 1 and now - self._samples[1][0] > _RATE_WINDOW:
            self._samples.popleft()

    @property
    def record(self) -> ProgressRecord:
        """Where the download stands now, with its rate over the last few seconds."""
        now = time.monotonic()
        base_t, base_done = self._samples[0]
        rate = (self._done - base_done) / (now - base_t) if now > base_t else 0.0
        return replace(self._record, done=self._done, rate=max(rate, 0.0), updated=time.time())

    async def keep_recorded(self) -> None:
        """Write the record whenever it changed, at most every ``RECORD_INTERVAL``; forever."""
        written: tuple[int, float] | None = None
        while True:
            record = self.record
            if written != (record.done, round(record.rate)):
                written = (record.done, round(record.rate))
                await asyncio.to_thread(self._write, record)
            await asyncio.sleep(RECORD_INTERVAL)

    def _write(self, record: ProgressRecord) -> None:
        with self._closing:  # a write still in its thread never brings a closed record back
            if self._closed:
                return
            try:
                self._path.parent.mkdir(exist_ok=True)
                # a fresh file of this writer's own: never through a link planted at its name
                self._tmp.unlink(missing_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                with os.fdopen(os.open(self._tmp, flags, 0o644), "w") as out:
                    out.write(json.dumps(asdict(record)))
                os.replace(self._tmp, self._path)  # replaces a link at the path, not its target
            except OSError:
                pass  # progress is for people watching; it never fails a download

    def close(self) -> None:
        """Remove the record; no write comes after."""
        with self._closing:
            self._closed = True
            for path in (self._tmp, self._path):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)


class _Metered:
    """A download's sink that tells its meter how far it is."""

    def __init__(self, inner: Sink, meter: Meter) -> None:
        self._inner = inner
        self._meter = meter
        self._done = 0

    async def write(self, chunk: bytes) -> None:
        await self._inner.write(chunk)
        self._done += len(chunk)
        self._meter.moved(self._done)

    async def rewind(self) -> None:
        await self._inner.rewind()
        self._done = 0
        self._meter.moved(0)


class ProgressBoard:
    """The downloads of one ``ImageCache``: meters for this process, records for others."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._meters: dict[str, Meter] = {}

    @contextlib.asynccontextmanager
    async def meter(self, image_id: str, total: int) -> AsyncIterator[Meter]:
        """Meter one download for its duration; its record goes when it ends, however."""
        meter = Meter(self.state_dir, image_id, total)
        self._meters[image_id] = meter
        recorder = asyncio.create_task(meter.keep_recorded())
        try:
            yield meter
        finally:
            recorder.cancel()  # no await: a cancelled download's clean-up never waits on it
            del self._meters[image_id]
            meter.close()

    def snapshot(self, image_id: str) -> ProgressRecord | None:
        """The image's download as it stands: this process's own meter, else the record
        another process left (which may be a dead one's: see ``writer_alive``)."""
        meter = self._meters.get(image_id)
        return meter.record if meter is not None else read_record(self.state_dir, image_id)
