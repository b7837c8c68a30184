"""What the command line shows of the downloads it waits on: bars on a terminal, or JSON lines.

One bar per image on stderr, drawn with rich (bytes, rate, time left), for the download this
process runs or the one it waits on in another process (read from that process's progress
record, see ``progress``). ``--progress json`` writes the same as JSON lines on stderr instead,
so that stdout keeps only the results. Both come from polling ``ProgressBoard.snapshot`` a few
times a second; nothing here runs inside the download, and nothing here decides how a call
ends: a display that fails (a stderr that cannot be written, a bug) is one warning, then shows
nothing more, and the calls it shows go on as they would have.

rich rather than tqdm: it keeps several bars in one live region that our own tick redraws
(no refresh thread, no cursor positions to manage per bar), sends results printed meanwhile
above the bars, and ships its type hints (mypy --strict); nova's tree already has it (cliff).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import IO, Any, Literal, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from pvmcache_async.core.progress import ProgressBoard, ProgressRecord, writer_alive
from pvmcache_async.errors import CacheError, InvalidInput
from pvmcache_async.models import CacheEntry, DeployResult, EnsureResult, EntryState
from pvmcache_async.names import validate_image_id

__all__ = [
    "Display",
    "DisplayMode",
    "add_argument",
    "choose",
    "filling",
    "filling_text",
    "human_bytes",
]

R = TypeVar("R", EnsureResult, DeployResult)
DisplayMode = Literal["bar", "json", "none"]
_TICK = 0.2  # seconds between two looks at the downloads
_JSON_EVERY = 0.5  # at most this often a progress event per image
log = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, as the VG and Glance count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
        if minutes >= 60
        else f"{minutes}:{secs:02d}"
    )


class Display:
    """Shows the images of some calls while they run: ``track`` each call, ``close`` at the
    end."""

    def __init__(self, board: ProgressBoard, mode: DisplayMode, stream: IO[str]) -> None:
        self.mode = mode
        self._board = board
        self._stream = stream
        self._calls: dict[str, int] = {}  # image -> calls still running
        self._outcome: dict[str, str] = {}  # image -> "miss"/"hit"/"joined"/"failed: ..."
        self._last: dict[str, tuple[float, int]] = {}  # json: when and at what byte last told
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._failed = False  # a step of the display failed: nothing more is shown

    async def track(self, image_id: str, call: Awaitable[R]) -> R:
        """Await ``call`` (an ensure or a deploy of ``image_id``) with its image on show."""
        if self.mode == "none":
            return await call
        try:
            image_id = validate_image_id(image_id)
        except InvalidInput:
            return await call  # nothing to show: the call itself says what is wrong
        self._calls[image_id] = self._calls.get(image_id, 0) + 1
        self._safely(self._start)
        try:
            result = await call
        except CacheError as exc:
            self._outcome[image_id] = f"failed: {exc.message}"
            raise
        finally:
            self._calls[image_id] -= 1
        self._outcome.setdefault(image_id, str(result.outcome))
        return result

    def _start(self) -> None:
        if self._ticker is not None:
            return
        if self.mode == "bar":
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[amount]}"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("eta {task.fields[eta]}"),
                console=Console(file=self._stream),
                auto_refresh=False,  # drawn by our own tick: no thread of rich's
                # results printed meanwhile go above the bars, but only to a terminal: a
                # stdout piped elsewhere keeps them
                redirect_stdout=sys.stdout.isatty(),
                redirect_stderr=False,
            )
            self._bars.start()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def close(self) -> None:
        """Stop showing, after a last look: every outcome shown. Never raises."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self._safely(self._tick)
        if self._bars is not None:
            bars, self._bars = self._bars, None
            self._failed = False  # the terminal is given back even after a failure
            self._safely(bars.stop)

    def _safely(self, step: Callable[[], object]) -> None:
        """Run one step of the display; the first that fails is one warning, and ends it."""
        if self._failed:
            return
        try:
            step()
        except Exception as exc:
            self._failed = True
            log.warning("progress not shown any further: %s: %s", type(exc).__name__, exc)

    async def _tick_forever(self) -> None:
        while True:
            self._safely(self._tick)
            await asyncio.sleep(_TICK)

    def _tick(self) -> None:
        for image_id in list(self._calls):
            record = self._board.snapshot(image_id)
            if self.mode == "json":
                self._emit_json(image_id, record)
            else:
                self._draw(image_id, record)
        if self._bars is not None:
            self._bars.refresh()

    def _writer(self, record: ProgressRecord) -> str:
        if record.pid == os.getpid():
            return ""
        return f" (pid {record.pid}{'' if writer_alive(record) else ', dead'})"

    def _draw(self, image_id: str, record: ProgressRecord | None) -> None:
        assert self._bars is not None
        outcome = self._outcome.get(image_id) if not self._calls[image_id] else None
        if image_id not in self._tasks:
            self._tasks[image_id] = self._bars.add_task(
                image_id[:8], total=None, amount="", rate="", eta="-:--"
            )
        task = self._tasks[image_id]
        if record is not None:
            self._bars.update(
                task,
                description=f"{image_id[:8]}{self._writer(record)}",
                total=record.total,
                completed=record.done,
                amount=f"{human_bytes(record.done)}/{human_bytes(record.total)}",
                rate=f"{human_bytes(record.rate)}/s",
                eta=_duration(record.eta),
            )
        if outcome is not None and outcome.startswith("failed"):
            self._bars.update(task, description=f"{image_id[:8]} failed", eta="-:--")
        elif outcome is not None:  # the record is gone with its download: fill the bar
            known = self._bars.tasks[task].total
            self._bars.update(
                task,
                description=f"{image_id[:8]} {outcome}",
                total=known or 1,  # a hit: never a byte to count
                completed=known or 1,
                amount=f"{human_bytes(known)}/{human_bytes(known)}" if known else "",
                eta="0:00",
            )

    def _emit_json(self, image_id: str, record: ProgressRecord | None) -> None:
        outcome = self._outcome.get(image_id) if not self._calls[image_id] else None
        if outcome is not None:
            event: dict[str, Any] = {"event": "done", "image_id": image_id, "result": outcome}
            if outcome.startswith("failed: "):
                event = {"event": "failed", "image_id": image_id, "error": outcome[8:]}
            self._print(event)
            del self._calls[image_id]
            return
        if record is None:
            return
        now = time.monotonic()
        when, done = self._last.get(image_id, (0.0, -1))
        if done == record.done or now - when < _JSON_EVERY:
            return
        self._last[image_id] = (now, record.done)
        alive = record.pid == os.getpid() or writer_alive(record)
        event = {"event": "progress", "image_id": image_id, **record.as_json()}
        self._print(event | {"writer_alive": alive})

    def _print(self, event: dict[str, Any]) -> None:
        print(json.dumps(event), file=self._stream, flush=True)


def filling(board: ProgressBoard, entries: Iterable[CacheEntry]) -> dict[str, dict[str, Any]]:
    """For ``ls --json``: the ``progress`` field of each filling image, by image id: its
    download's record with the rate, time left and whether its writer is alive, or None
    when no process has recorded one (e.g. it died before its first record)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.state is not EntryState.FILLING:
            continue
        record = board.snapshot(entry.image_id)
        progress = None
        if record is not None:
            alive = record.pid == os.getpid() or writer_alive(record)
            progress = record.as_json() | {
                "writer_alive": alive,
                "started": _iso(record.started),
                "updated": _iso(record.updated),
            }
        found[entry.image_id] = {"progress": progress}
    return found


def filling_text(fields: dict[str, Any] | None) -> str:
    """For ``ls``: a filling image's download in a few words, after its row; '' otherwise."""
    if fields is None:
        return ""
    progress = fields["progress"]
    if progress is None:
        return "  (no progress recorded)"
    done, total, rate = progress["done"], progress["total"], progress["rate"]
    writer = f"pid {progress['writer_pid']} {'alive' if progress['writer_alive'] else 'dead'}"
    if not progress["writer_alive"]:
        return f"  {human_bytes(done)}/{human_bytes(total)}, writer {writer}"
    return (
        f"  {human_bytes(done)}/{human_bytes(total)} {100 * done // max(total, 1)}% "
        f"{human_bytes(rate)}/s eta {_duration(progress['eta'])}, writer {writer}"
    )


def choose(board: ProgressBoard, mode: str, quiet: bool, stream: IO[str]) -> Display:
    """The display the options ask for: ``mode`` is ``auto`` (bars when ``stream`` is a
    terminal and the output is not ``quiet``, i.e. not ``--json``), ``bar``, ``json`` or
    ``none``."""
    modes: dict[str, DisplayMode] = {"bar": "bar", "json": "json", "none": "none"}
    if mode == "auto":
        return Display(board, "bar" if stream.isatty() and not quiet else "none", stream)
    if mode not in modes:
        raise InvalidInput(f"--progress {mode!r}: choose auto, bar, json or none")
    return Display(board, modes[mode], stream)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress`` for a subcommand that waits on downloads."""
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "json", "none"),
        default="auto",
        help="progress on stderr: bars (auto: on a terminal, without --json), JSON lines "
        "for scripts, or none (default %(default)s)",
    )
