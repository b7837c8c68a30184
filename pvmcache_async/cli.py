"""The operators' command line, ``pvmcache-async``: it translates, the cache decides.

Global options come before the subcommand; each has an environment variable. With ``--json``
a subcommand prints only JSON on stdout. Any failure exits non-zero with one line on stderr
naming the image and the cause (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import aio, auth, display
from .errors import CacheError, InvalidInput
from .glance import DEFAULT_READ_TIMEOUT, GlanceClient, RetryPolicy
from .models import CacheEntry
from .storage import default_vg_spec, open_vg
from .transfer import CacheSettings, ImageCache

PROG = "pvmcache-async"
_DEFAULTS = CacheSettings()
_RETRY = RetryPolicy()
N = TypeVar("N", int, float)
_STORM_MODES = ("cache", "no-cache", "per-image-lock")


def _env_number(name: str, default: N, kind: Callable[[str], N]) -> N:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SystemExit(f"{PROG}: error: {name}={raw!r} is not {what}") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too, like every other failure (usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, description="Cache Glance images in a volume group; deploy instances as clones."
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
        default=os.environ.get("PVMCACHE_VG") or default_vg_spec(),
        help="volume group: file:PATH or powervm:... [PVMCACHE_VG] (default %(default)s)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=_env_number("PVMCACHE_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, float),
        help="seconds a read from Glance may stall [PVMCACHE_READ_TIMEOUT] (default %(default)s)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=_env_number("PVMCACHE_RETRIES", _RETRY.retries, int),
        help="failed requests to Glance retried in a row, with backoff, before giving up "
        "[PVMCACHE_RETRIES] (default %(default)s)",
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
        type=int,
        default=_DEFAULTS.max_downloads,
        help="images downloaded at once (default %(default)s)",
    )
    p.add_argument(
        "--max-clones",
        type=int,
        default=_DEFAULTS.max_clones,
        help="instance disks cloned at once (default %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="log to stderr; tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("deploy", help="cache the image, then clone it for each instance")
    d.add_argument("image_id")
    d.add_argument(
        "--instance",
        action="append",
        required=True,
        metavar="UUID",
        help="an instance uuid; repeat for several",
    )
    d.add_argument("--json", action="store_true")
    display.add_argument(d)

    f = sub.add_parser("prefetch", help="cache images without deploying")
    f.add_argument("image_ids", nargs="+", metavar="IMAGE_ID")
    f.add_argument("--json", action="store_true")
    display.add_argument(f)

    ls = sub.add_parser("ls", help="list the cached images")
    ls.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="remove cached images that are not in use")
    pr.add_argument(
        "--in-use",
        action="append",
        default=[],
        metavar="IMAGE_ID",
        help="an image in use, never removed; repeat for several",
    )
    pr.add_argument(
        "--min-age",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="remove only images unused for this long (default %(default)s)",
    )
    pr.add_argument(
        "--max-bytes",
        type=int,
        metavar="N",
        help="then remove least recently used unused images until the cache fits",
    )
    pr.add_argument(
        "--max-count", type=int, metavar="N", help="likewise, until at most N images are cached"
    )
    pr.add_argument("--json", action="store_true")

    st = sub.add_parser("storm", help="benchmark a deploy storm on a real local Glance")
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
        default=",".join(_STORM_MODES),
        help="comma-separated modes to run (default %(default)s)",
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
    return ImageCache(open_vg(args.vg), glance, settings)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _entry_json(e: CacheEntry) -> dict[str, Any]:
    return {
        "image_id": e.image_id,
        "cache_disk": e.cache_disk,
        "size": e.size,
        "state": e.state.value,
        "created": _iso(e.created),
        "last_used": _iso(e.last_used),
    }


async def _each(calls: Sequence[Awaitable[Any]], human: Callable[[Any], str], args: Any) -> int:
    """Run calls at once; print each result as it completes (a JSON line with ``--json``),
    each failure as one line on stderr. 1 if any failed."""
    failures = 0
    for next_done in asyncio.as_completed(calls):
        try:
            result = await next_done
        except CacheError as exc:
            failures += 1
            if args.debug:
                logging.getLogger(PROG).exception("failed")
            print(f"{PROG}: {exc}", file=sys.stderr)
            continue
        print(json.dumps(asdict(result)) if args.json else human(result), flush=True)
    return 1 if failures else 0


async def _storm(args: argparse.Namespace) -> int:
    from .storm import StormPlan, format_report, run_storm  # only this command needs devglance

    if args.images < 1 or args.deploys < 1:
        raise InvalidInput("storm needs at least one image and one deploy")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = sorted(set(modes) - set(_STORM_MODES))
    if unknown or not modes:
        raise InvalidInput(f"unknown storm mode {unknown}: choose from {', '.join(_STORM_MODES)}")
    if args.plot is not None:
        from .storm.plot import plot, pyplot

        pyplot()  # fail now, not after the storm
    plan = StormPlan(
        images=args.images,
        image_size=args.image_size,
        deploys=args.deploys,
        verify=not args.no_verify,
        modes=modes,
        single=not args.no_single,
        speed=args.speed,
    )
    report = await run_storm(plan, args.workdir)
    if args.plot is not None:
        plot(report, args.plot)
    print(json.dumps(report.as_json()) if args.json else format_report(report))
    return 0


async def _run(args: argparse.Namespace) -> int:
    if args.command == "storm":
        return await _storm(args)
    cache = _open_cache(args)
    shown = display.choose(cache.progress, getattr(args, "progress", "none"), args.json, sys.stderr)
    try:
        if args.command == "deploy":
            return await _each(
                [shown.track(args.image_id, cache.deploy(args.image_id, i)) for i in args.instance],
                lambda r: (
                    f"instance {r.instance}: disk {r.disk} cloned from {r.cache_disk} "
                    f"({r.result}, {r.bytes_fetched} bytes fetched, {r.seconds:.2f} s)"
                ),
                args,
            )
        if args.command == "prefetch":
            return await _each(
                [shown.track(i, cache.ensure(i)) for i in args.image_ids],
                lambda r: (
                    f"image {r.image_id}: {r.cache_disk} ({r.result}, "
                    f"{r.bytes_fetched} bytes fetched, {r.seconds:.2f} s)"
                ),
                args,
            )
        if args.command == "ls":
            entries = await cache.entries()
            filling = display.filling(cache.progress, entries)  # their downloads, if recorded
            if args.json:
                print(json.dumps([_entry_json(e) | filling.get(e.image_id, {}) for e in entries]))
            else:
                print(f"{'IMAGE ID':36}  {'CACHE DISK':15}  {'SIZE':>14}  {'STATE':7}  LAST USED")
                for e in entries:
                    print(
                        f"{e.image_id:36}  {e.cache_disk:15}  {e.size:>14}  "
                        f"{e.state.value:7}  {_iso(e.last_used)}"
                        + display.filling_text(filling.get(e.image_id))
                    )
            return 0
        if args.command == "prune":
            result = await cache.prune(
                in_use=args.in_use,
                min_age=args.min_age,
                max_bytes=args.max_bytes,
                max_count=args.max_count,
            )
            if args.json:
                print(json.dumps(asdict(result)))
            else:
                print(f"removed {len(result.removed)}: {' '.join(result.removed) or '-'}")
                print(f"kept {len(result.kept)}: {' '.join(result.kept) or '-'}")
            return 0
        raise InvalidInput(f"unknown command {args.command!r}")
    finally:
        await shown.close()
        await cache.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return aio.run(_run(args))
    except CacheError as exc:
        if args.debug:
            raise
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one-line promise holds for bugs too; --debug shows them
        if args.debug:
            raise
        print(f"{PROG}: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
