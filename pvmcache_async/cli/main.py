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
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from pvmcache_async import aio
from pvmcache_async.cli import auth, display
from pvmcache_async.errors import CacheError, InvalidInput, shown
from pvmcache_async.glance.client import DEFAULT_READ_TIMEOUT, GlanceClient
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.glance.urls import redact_url
from pvmcache_async.models import CacheEntry
from pvmcache_async.names import InstanceDisks, validate_instance_uuid
from pvmcache_async.storage import check_vg_spec, default_vg_spec, open_vg
from pvmcache_async.transfer import CacheSettings, ImageCache

PROG = "pvmcache-async"
log = logging.getLogger(PROG)
_DEFAULTS = CacheSettings()
_RETRY = RetryPolicy()
T = TypeVar("T")
_EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number
_MAX_ID_ARG = 100  # a uuid has 36 characters; anything far longer is refused unread
STORM_MISSING = (
    "storm is a dev tool: install it with `pip install -e ./dev` from a checkout "
    "(scripts/bootstrap does)"
)


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """A finite number of seconds above 0 (or from 0, with ``zero``); nan and inf refused."""
    bound = ">= 0" if zero else "above 0"

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"{shown(text)} is not a finite number of seconds {bound}"
            )
        return value

    return seconds


def _whole(low: int) -> Callable[[str], int]:
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a whole number >= {low}")
        return value

    return whole


def _id_arg(text: str) -> str:
    """An id as given; one far longer than a uuid is refused before anything echoes it."""
    if len(text) > _MAX_ID_ARG:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a uuid (8-4-4-4-12 hex digits)")
    return text


def _vg_spec(text: str) -> str:
    """A VG spec of a form ``open_vg`` takes (the VG itself is looked at later)."""
    try:
        check_vg_spec(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _env_value(name: str, default: T, kind: Callable[[str], T]) -> T:
    """The environment variable ``name`` as ``kind`` reads it; a bad one is a usage error,
    one line naming the variable (status 2, as for the option itself)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except argparse.ArgumentTypeError as exc:
        print(f"{PROG}: error: {name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too, like every other failure (usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Cache Glance images in a volume group; deploy instances as clones.",
        epilog="Exit status: 0 done, 1 failed, 2 usage error, 130 SIGINT, 143 SIGTERM (the work "
        "under way cancelled and undone first).",
    )
    p.add_argument(
        "--glance-url",
        default=os.environ.get("PVMCACHE_GLANCE_URL"),
        help="Glance v2 endpoint, e.g. http://127.0.0.1:9292 [PVMCACHE_GLANCE_URL]",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("OS_AUTH_TOKEN"),
        help="sent as X-Auth-Token, never printed [OS_AUTH_TOKEN]",
    )
    auth.add_arguments(p)
    p.add_argument(
        "--vg",
        type=_vg_spec,
        default=_env_value("PVMCACHE_VG", default_vg_spec(), _vg_spec),
        help="volume group: file:PATH or powervm:... [PVMCACHE_VG] (default %(default)s)",
    )
    p.add_argument(
        "--read-timeout",
        type=_seconds(zero=False),
        default=_env_value("PVMCACHE_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, _seconds(zero=False)),
        help="seconds a read from Glance may stall [PVMCACHE_READ_TIMEOUT] (default %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=_whole(1),
        default=_env_value("PVMCACHE_RETRIES", _RETRY.retries, _whole(1)),
        help="failed attempts in a row (retried with backoff) before a request to Glance "
        "gives up [PVMCACHE_RETRIES] (default %(default)s)",
    )
    p.add_argument(
        "--ca-file",
        default=os.environ.get("PVMCACHE_CA_FILE"),
        help="CA bundle to verify Glance's TLS certificate [PVMCACHE_CA_FILE]",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify Glance's TLS certificate (testing only)",
    )
    p.add_argument(
        "--max-downloads",
        type=_whole(1),
        default=_DEFAULTS.max_downloads,
        help="images downloaded at once (default %(default)s)",
    )
    p.add_argument(
        "--max-clones",
        type=_whole(1),
        default=_DEFAULTS.max_clones,
        help="instance disks cloned at once (default %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="log to stderr; tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("deploy", help="cache the image, then clone it for each instance")
    d.add_argument("image_id", type=_id_arg)
    d.add_argument(
        "--instance",
        type=_id_arg,
        action="append",
        required=True,
        metavar="UUID",
        help="an instance uuid; repeat for several",
    )
    d.add_argument("--json", action="store_true")
    display.add_argument(d)

    f = sub.add_parser("prefetch", help="cache images without deploying")
    f.add_argument("image_ids", nargs="+", type=_id_arg, metavar="IMAGE_ID")
    f.add_argument("--json", action="store_true")
    display.add_argument(f)

    ls = sub.add_parser("ls", help="list the cached images")
    ls.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="remove cached images that are not in use")
    pr.add_argument(
        "--in-use",
        type=_id_arg,
        action="append",
        default=[],
        metavar="IMAGE_ID",
        help="an image in use, never removed; repeat for several",
    )
    pr.add_argument(
        "--min-age",
        type=_seconds(zero=True),
        default=86400.0,
        metavar="SECONDS",
        help="remove only images unused for this long (default %(default)s)",
    )
    pr.add_argument(
        "--max-bytes",
        type=_whole(0),
        metavar="N",
        help="then remove least recently used unused images until the cache fits",
    )
    pr.add_argument(
        "--max-count",
        type=_whole(0),
        metavar="N",
        help="likewise, until at most N images are cached",
    )
    pr.add_argument("--json", action="store_true")

    storm_modes = _storm_modes()
    st = sub.add_parser(
        "storm",
        help="benchmark a deploy storm on a real local Glance",
        description=None if storm_modes else STORM_MISSING,
    )
    st.add_argument("--images", type=int, default=4, help="images (default %(default)s)")
    st.add_argument(
        "--image-size",
        type=_size,
        default="32MiB",
        help="bytes per image, with KiB/MiB/GiB (default %(default)s)",
    )
    st.add_argument("--deploys", type=int, default=40, help="deploys at once (default %(default)s)")
    st.add_argument(
        "--workdir", type=Path, help="where Glance, images and VGs go (default: a temp dir)"
    )
    st.add_argument(
        "--no-verify", action="store_true", help="skip comparing every disk with its image"
    )
    st.add_argument(
        "--modes",
        help=f"comma-separated modes to run (default {','.join(storm_modes[0])}; "
        f"through nova: {','.join(storm_modes[1])})"
        if storm_modes
        else "comma-separated modes to run (the dev package lists them)",
    )
    st.add_argument(
        "--through",
        choices=("vg", "nova"),
        default="vg",
        help="deploy straight into file VGs (default), or boot --deploys servers through a "
        "real nova cloud on loopback (as root: installs RabbitMQ and MariaDB)",
    )
    st.add_argument(
        "--hosts", type=int, default=3, help="nova-compute hosts with --through nova (default 3)"
    )
    st.add_argument(
        "--no-single",
        action="store_true",
        help="skip the single cold/warm deploys and the curl/cp references",
    )
    st.add_argument(
        "--speed", action="store_true", help="also measure each speed choice before and after"
    )
    st.add_argument("--plot", type=Path, metavar="FILE.png", help="draw latencies and a timeline")
    st.add_argument("--json", action="store_true")
    return p


def _storm_modes() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The storm's modes and its modes through nova; None where the dev package is missing.

    Only ``storm.modes`` is imported (nothing else): every command builds this parser.
    """
    try:
        from pvmcache_dev.storm.modes import MODES, NOVA_MODES
    except ModuleNotFoundError as exc:
        if exc.name not in ("pvmcache_dev", "pvmcache_dev.storm", "pvmcache_dev.storm.modes"):
            raise  # the dev package is there but broken: not a missing install
        return None
    return MODES, NOVA_MODES


_SIZE = re.compile(r"(\d+)\s*(?:([kmg])(?:i?b)?)?", re.IGNORECASE)


def _size(text: str) -> int:
    """A byte count with an optional binary unit: 4096, 64KiB, 32MiB, 1GiB (or 64k, 1g)."""
    match = _SIZE.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size like 4096, 64KiB, 1GiB")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[(match[2] or "").lower()]


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
    cancelled by ``ImageCache.close`` and discarded), and ``settle`` returns only once all
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

    async def settle(self) -> None:
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
        await session.settle()  # every operation has ended, clean-up included, before
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
    if args.command == "storm" and _storm_modes() is None:  # before any work starts
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
