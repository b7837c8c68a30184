"""The command line's arguments: each option, its environment variable, bad values (status 2)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from pvmcache_async.cli import auth, display
from pvmcache_async.errors import InvalidInput, shown
from pvmcache_async.glance.client import DEFAULT_READ_TIMEOUT
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.storage import check_vg_spec, default_vg_spec
from pvmcache_async.transfer import CacheSettings

PROG = "pvmcache-async"
T = TypeVar("T")
_DEFAULTS = CacheSettings()
_RETRY = RetryPolicy()
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

    modes = storm_modes()
    st = sub.add_parser(
        "storm",
        help="benchmark a deploy storm on a real local Glance",
        description=None if modes else STORM_MISSING,
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
        help=f"comma-separated modes to run (default {','.join(modes[0])}; "
        f"through nova: {','.join(modes[1])})"
        if modes
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


def storm_modes() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
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
