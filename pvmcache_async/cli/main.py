"""The operators' command line, ``pvmcache-async``: it translates, the cache decides.

Global options come before the subcommand; each has an environment variable. With ``--json``
a subcommand prints only JSON on stdout. Any failure exits non-zero with one line on stderr
naming the image and the cause (a traceback only with ``--debug``).

SIGINT and SIGTERM cancel the deploys and downloads under way and wait for their clean-up
(a partial download discarded, a clone undone) before the cache closes; then the command
exits 130 or 143 with one line on stderr. Further signals meanwhile do not cut that short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from pvmcache_async import aio
from pvmcache_async.cli import auth, display
from pvmcache_async.cli.parser import PROG, STORM_MISSING, build_parser, storm_modes
from pvmcache_async.errors import CacheError, InvalidInput
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.glance.urls import redact_url
from pvmcache_async.models import CacheEntry
from pvmcache_async.names import InstanceDisks, validate_instance_uuid
from pvmcache_async.storage import open_vg
from pvmcache_async.transfer import CacheSettings, ImageCache

log = logging.getLogger(PROG)
T = TypeVar("T")
_EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


def _open_cache(args: argparse.Namespace) -> ImageCache:
    glance = access = None
    if args.command in ("deploy", "prefetch"):  # ls and prune never ask keystone or Glance
        access = auth.glance_access(
            cloud=args.os_cloud,
            region_name=args.os_region_name,
            interface=args.os_interface,
            glance_url=args.glance_url,
            token=args.token,
            ca_file=args.ca_file,
            insecure=args.insecure,
        )
    if access is not None:  # without one, hits still work; a miss says what is missing
        glance = GlanceClient(
            access.url,
            token=access.token,
            ca_file=access.ca_file,
            verify_tls=access.verify_tls,
            read_timeout=args.read_timeout,
            retry=RetryPolicy(retries=args.retries),
        )
    settings = CacheSettings(max_downloads=args.max_downloads, max_clones=args.max_clones)
    vg = open_vg(args.vg, create=args.command not in ("ls", "prune"))  # a typo makes nothing
    return ImageCache(vg, glance, settings)


def _result_json(result: Any) -> dict[str, Any]:
    """A deploy's or prefetch's line of --json: the outcome under its pinned key "result"."""
    return {("result" if k == "outcome" else k): v for k, v in asdict(result).items()}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _entry_json(e: CacheEntry) -> dict[str, Any]:
    ahead = {"clock_ahead": True} if e.clock_ahead else {}  # its times were read as now
    return {
        "image_id": e.image_id,
        "cache_disk": e.cache_disk,
        "size": e.size,
        "state": e.state.value,
        "created": _iso(e.created),
        "last_used": _iso(e.last_used),
    } | ahead


class _Session:
    """One command's operations, run as tasks that a signal cancels, and its output.

    SIGINT and SIGTERM cancel every operation under way; each runs its own clean-up to the
    end (the core's: a cancelled deploy undoes its clone, a download left by every deploy is
    cancelled by ``ImageCache.close`` and discarded), and ``cancel_and_wait`` returns only once all
    have ended, so the cache closes after them. Only the first signal acts.

    A write to stdout that fails (a closed pipe, a full disk) is remembered, not raised: the
    operations end as they would have, and the command then fails saying so.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.output_error: OSError | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        if self.signal is not None:
            task.cancel()
        return task

    def on_signal(self, signum: signal.Signals) -> None:
        if self.signal is not None:
            log.info("%s: still waiting for the clean-up", signum.name)
            return
        self.signal = signum
        running = [t for t in self._tasks if not t.done()]
        log.info("%s: cancelling %d operations, then cleaning up", signum.name, len(running))
        for task in running:
            task.cancel()

    def interrupted(self) -> bool:
        """Whether a CancelledError just caught came from an operation a signal cancelled
        (not from the cancellation of the task that caught it, which must go on up)."""
        task = asyncio.current_task()
        return self.signal is not None and not (task is not None and task.cancelling())

    async def cancel_and_wait(self) -> None:
        """Cancel any operation still running (an error ended the command early) and wait
        until every one has ended, its clean-up included."""
        running = [t for t in self._tasks if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for task in self._tasks:
            if not task.cancelled():
                task.exception()  # retrieved: an error reported elsewhere, or a bug re-raised

    def out(self, text: str) -> None:
        if self.output_error is not None:
            return
        try:
            print(text, flush=True)
        except OSError as exc:
            self.output_error = exc
            # what is still buffered would fail again at exit: stdout goes nowhere from now
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _each(
    session: _Session,
    calls: Sequence[Coroutine[Any, Any, Any]],
    human: Callable[[Any], str],
    args: Any,
) -> int:
    """Run calls at once; print each result as it completes (a JSON line with ``--json``),
    each failure as one line on stderr. 1 if any failed; a call a signal cancelled is not
    a failure of its own (the command reports the signal)."""
    failures = 0
    for next_done in asyncio.as_completed([session.start(c) for c in calls]):
        try:
            result = await next_done
        except asyncio.CancelledError:
            if not session.interrupted():
                raise
            continue
        except CacheError as exc:
            failures += 1
            if args.debug:
                log.exception("failed")
            print(f"{PROG}: {exc}", file=sys.stderr)
            continue
        session.out(json.dumps(_result_json(result)) if args.json else human(result))
    return 1 if failures else 0


def _distinct_instances(instances: Sequence[str]) -> None:
    """Refuse an instance given twice, or two whose disks would have one name, up front:
    racing each other, one would fail on the disk that the other made (the core refuses
    the second of those too, in the same words, but only once the first has started)."""
    given: set[str] = set()
    disks = InstanceDisks()
    for text in instances:
        instance = validate_instance_uuid(text)
        if instance in given:
            raise InvalidInput(f"instance {instance} is given more than once")
        given.add(instance)
        disks.claim(instance)


async def _storm(args: argparse.Namespace, session: _Session) -> int:
    from pvmcache_dev.storm import command  # the dev package; main checked it is there

    return await command.run(args, session.out)


async def _run(args: argparse.Namespace, session: _Session) -> int:
    if args.command == "storm":
        return await _operation(session, _storm(args, session)) or 0
    if args.command == "deploy":
        _distinct_instances(args.instance)
    cache = _open_cache(args)
    bars = display.choose(cache.progress, getattr(args, "progress", "none"), args.json, sys.stderr)
    try:
        if args.command == "deploy":
            return await _each(
                session,
                [bars.track(args.image_id, cache.deploy(args.image_id, i)) for i in args.instance],
                lambda r: (
                    f"instance {r.instance}: disk {r.disk} cloned from {r.cache_disk} "
                    f"({r.outcome}, {r.bytes_fetched} bytes fetched, {r.seconds:.2f} s)"
                ),
                args,
            )
        if args.command == "prefetch":
            return await _each(
                session,
                [bars.track(i, cache.ensure(i)) for i in args.image_ids],
                lambda r: (
                    f"image {r.image_id}: {r.cache_disk} ({r.outcome}, "
                    f"{r.bytes_fetched} bytes fetched, {r.seconds:.2f} s)"
                ),
                args,
            )
        if args.command == "ls":
            entries = await _operation(session, cache.entries())
            if entries is None:
                return 0  # interrupted: main reports the signal
            filling = display.filling(cache.progress, entries)  # their downloads, if recorded
            if args.json:
                session.out(
                    json.dumps([_entry_json(e) | filling.get(e.image_id, {}) for e in entries])
                )
            else:
                session.out(
                    f"{'IMAGE ID':36}  {'CACHE DISK':15}  {'SIZE':>14}  {'STATE':7}  LAST USED"
                )
                for e in entries:
                    session.out(
                        f"{e.image_id:36}  {e.cache_disk:15}  {e.size:>14}  "
                        f"{e.state.value:7}  {_iso(e.last_used)}"
                        + (" (was ahead of the clock: counted as now)" if e.clock_ahead else "")
                        + display.filling_text(filling.get(e.image_id))
                    )
            return 0
        if args.command == "prune":
            pruning = cache.prune(
                in_use=args.in_use,
                min_age=args.min_age,
                max_bytes=args.max_bytes,
                max_count=args.max_count,
            )
            result = await _operation(session, pruning)
            if result is None:
                return 0
            if args.json:
                session.out(json.dumps(asdict(result)))
            else:
                session.out(f"removed {len(result.removed)}: {' '.join(result.removed) or '-'}")
                session.out(f"kept {len(result.kept)}: {' '.join(result.kept) or '-'}")
            return 0
        raise InvalidInput(f"unknown command {args.command!r}")
    finally:
        await session.cancel_and_wait()  # every operation has ended, clean-up included, before
        await bars.close()
        await cache.close()  # the cache cancels its downloads and closes


async def _operation(session: _Session, work: Coroutine[Any, Any, T]) -> T | None:
    """Run one operation; None if a signal cancelled it."""
    try:
        return await session.start(work)
    except asyncio.CancelledError:
        if not session.interrupted():
            raise
        return None


async def _main(args: argparse.Namespace, session: _Session) -> int:
    loop = asyncio.get_running_loop()
    handled = []
    for signum in _EXIT_STATUS:
        try:
            loop.add_signal_handler(signum, session.on_signal, signum)
        except (RuntimeError, ValueError):  # not the main thread: the embedder's signals
            break
        handled.append(signum)
    try:
        return await _run(args, session)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


class _RedactingFormatter(logging.Formatter):
    """Log lines, tracebacks included, with every URL cut as ``redact_url`` cuts it: the
    libraries' own logs (keystoneauth's, aiohttp's) echo URLs as they were given."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(record))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, handlers=[handler])
    session = _Session()
    if args.command == "storm" and storm_modes() is None:  # before any work starts
        print(f"{PROG}: {STORM_MISSING}", file=sys.stderr)
        return 2
    try:
        status = aio.run(_main(args, session))
    except CacheError as exc:
        if args.debug:
            raise
        print(f"{PROG}: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # a SIGINT before the handlers were installed, or after
        print(f"{PROG}: interrupted by SIGINT", file=sys.stderr)
        return 130
    except Exception as exc:  # the one-line promise holds for bugs too; --debug shows them
        if args.debug:
            raise
        print(f"{PROG}: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    if session.output_error is not None:
        cause = session.output_error.strerror or session.output_error
        print(f"{PROG}: writing the results to stdout failed ({cause})", file=sys.stderr)
        status = status or 1
    if session.signal is not None:
        print(
            f"{PROG}: interrupted by {session.signal.name}; "
            "the work under way was cancelled and undone",
            file=sys.stderr,
        )
        return _EXIT_STATUS[session.signal]
    return status
