"""Progress of downloads, seen from the process that fills an image and from any other.

The process that downloads an image keeps a ``Meter`` of it (``ProgressBoard.meter``): bytes
written, a rate over the last few seconds, its pid and start. Other processes on the same VG
read it from a small JSON file, ``<state_dir>/progress/<image id>.json``, which the meter
replaces atomically at most ``RECORD_INTERVAL`` apart (never once per chunk) and removes when
the download ends. A writer that died leaves its file behind: ``writer_alive`` tells a live
download from a dead one by the pid and that process's start time (a reused pid is not alive).

The records' directory is a state directory like ``locks`` (``locks.private_dir``): a writer
makes, renames and removes its files only inside it, through a descriptor of the directory
itself, so a link planted at its path or swapped in later never takes them elsewhere; one
refused is one warning, and downloads go unrecorded meanwhile (progress never fails one).
A record is read as any state file another process writes (``statefiles.read_json``): a bad
one is one warning and no record.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pvmcache_async.core.statefiles import open_directory, read_json, replace_json, warn_once
from pvmcache_async.errors import InvalidInput, StorageError, shown
from pvmcache_async.locks import private_dir
from pvmcache_async.names import validate_image_id
from pvmcache_async.storage.base import Sink

__all__ = [
    "RECORD_INTERVAL",
    "Meter",
    "ProgressBoard",
    "ProgressRecord",
    "read_record",
    "writer_alive",
]

RECORD_INTERVAL = 0.25  # seconds between two writes of a record file
RECORD_CAP = 4096  # bytes: a record takes about 250; a larger file is not one
_RATE_WINDOW = 5.0  # seconds of samples the rate is taken over
_COUNT_LIMIT = 1 << 63  # bytes, rates and clock ticks in a record are below it
_PID_LIMIT = (1 << 22) + 1  # the largest pid_max Linux allows, and one
_TIME_LIMIT = 1e11  # unix time: far beyond any clock, still a date datetime can show


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


def _records_dir(state_dir: Path) -> Path:
    return state_dir / "progress"


def _whole(raw: dict[str, Any], key: str, low: int, high: int) -> int:
    value = raw[key]
    if type(value) is not int or not low <= value < high:
        raise ValueError(f"{key} is {shown(value)}")
    return value


def _real(raw: dict[str, Any], key: str, high: float) -> float:
    value = raw[key]
    if type(value) not in (int, float) or not 0 <= value < high:  # nan and inf too
        raise ValueError(f"{key} is {shown(value)}")
    return float(value)


def _record_of(image_id: str) -> Callable[[dict[str, Any]], ProgressRecord]:
    """The parser of the image's record: every field there, of its type and in its range."""

    def parse(raw: dict[str, Any]) -> ProgressRecord:
        missing = sorted({f.name for f in fields(ProgressRecord)} - raw.keys())
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if raw["image_id"] != image_id:
            raise ValueError(f"it names image {shown(raw['image_id'])}")
        start = None if raw["pid_start"] is None else _whole(raw, "pid_start", 0, _COUNT_LIMIT)
        return ProgressRecord(
            image_id,
            done=_whole(raw, "done", 0, _COUNT_LIMIT),
            total=_whole(raw, "total", 0, _COUNT_LIMIT),
            rate=_real(raw, "rate", _COUNT_LIMIT),
            pid=_whole(raw, "pid", 1, _PID_LIMIT),
            pid_start=start,
            started=_real(raw, "started", _TIME_LIMIT),
            updated=_real(raw, "updated", _TIME_LIMIT),
        )

    return parse


def read_record(state_dir: Path, image_id: str) -> ProgressRecord | None:
    """The last record of the image's download, by any process; None if there is none, or
    if its file is not a record (one warning: see ``statefiles.read_json``)."""
    try:
        image_id = validate_image_id(image_id)
    except InvalidInput:
        return None  # not an image of ours: no record of it
    return read_json(
        _records_dir(state_dir),
        f"{image_id}.json",
        _record_of(image_id),
        what="progress record",
        cap=RECORD_CAP,
    )


def _open_records(state_dir: Path, *, create: bool) -> int | None:
    """The records' directory, open (made first with ``create``); None if it is absent, or
    refused (a link, not a directory): one warning, once for every use of it."""
    directory = _records_dir(state_dir)
    try:
        return open_directory(private_dir(directory) if create else directory)
    except FileNotFoundError:
        return None
    except (StorageError, OSError) as exc:  # OSError: a link swapped in since private_dir
        why = exc.message if isinstance(exc, StorageError) else f"state directory {directory}"
        if isinstance(exc, OSError):
            why += " is a symbolic link" if exc.errno == errno.ELOOP else f": {exc.strerror}"
        warn_once(directory, f"progress of downloads not recorded: {why}")
        return None


def discard_record(state_dir: Path, image_id: str) -> None:
    """Remove the image's record and any writer's temporary (a dead writer's, found under the
    image's lock), inside the records' own directory; what cannot be removed stays."""
    image_id = validate_image_id(image_id)
    directory = _open_records(state_dir, create=False)
    if directory is None:
        return
    try:
        for name in os.listdir(directory):
            if name == f"{image_id}.json" or (
                name.startswith(f".{image_id}.") and name.endswith(".tmp")
            ):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=directory)
    finally:
        os.close(directory)


class Meter:
    """The progress of one download in this process; ``ProgressBoard.meter`` makes one.

    The download only counts (``moved``); a task of the meter's own writes the record file
    every ``RECORD_INTERVAL`` while it changes, so a stalled download's last bytes are on
    record too, and a fast one costs no file write per chunk.
    """

    def __init__(self, state_dir: Path, image_id: str, total: int) -> None:
        self._state_dir = state_dir
        self._directory = _records_dir(state_dir)
        self._dir_fd: int | None = None  # the directory, open; None before the first write
        self._name = f"{validate_image_id(image_id)}.json"
        self._tmp = f".{image_id}.{os.getpid()}.tmp"  # this writer's own
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
            if self._closed or (directory := self._records()) is None:
                return
            with contextlib.suppress(OSError):  # progress is for watchers: it fails no download
                replace_json(directory, self._name, self._tmp, asdict(record), mode=0o644)

    def _records(self) -> int | None:
        """The records' directory, open (again, if its path now names another one); None
        while it is refused (see ``_open_records``)."""
        if self._dir_fd is not None:
            held = os.fstat(self._dir_fd)
            try:
                now = os.lstat(self._directory)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return self._dir_fd
            self._remove_own()  # from the directory it was in, which its path no longer names
        self._dir_fd = _open_records(self._state_dir, create=True)
        return self._dir_fd

    def close(self) -> None:
        """Remove the record; no write comes after."""
        with self._closing:
            self._closed = True
            self._remove_own()

    def _remove_own(self) -> None:
        """Remove this writer's record and temporary, and close their directory."""
        directory, self._dir_fd = self._dir_fd, None
        if directory is None:
            return  # nothing written
        for name in (self._tmp, self._name):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=directory)
        os.close(directory)


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
