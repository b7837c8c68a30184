"""``pvmcache-async storm``: what the command line runs once it has parsed the arguments.

The product's command line defines the options (``--help`` works without this package) and
imports this module only for the ``storm`` subcommand. Bad input raises ``InvalidInput`` and a
dev server that fails raises ``CacheError``: the command line prints either as its one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

from pvmcache_async.errors import CacheError, InvalidInput

from .. import DevError
from .modes import MODES, NOVA_MODES

__all__ = ["run"]


async def run(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Run the storm ``args`` describe; ``out`` prints a line of the report (or its JSON)."""
    from . import StormPlan, format_report, run_storm

    if args.images < 1 or args.deploys < 1:
        raise InvalidInput("storm needs at least one image and one deploy")
    known = NOVA_MODES if args.through == "nova" else MODES
    modes = tuple(m.strip() for m in (args.modes or ",".join(known)).split(",") if m.strip())
    unknown = sorted(set(modes) - set(known))
    if unknown or not modes:
        raise InvalidInput(f"unknown storm mode {unknown}: choose from {', '.join(known)}")
    if args.through == "nova":
        return await _through_nova(args, modes, out)
    if args.plot is not None:
        from .plot import plot, pyplot

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
    try:
        report = await run_storm(plan, args.workdir)
    except DevError as exc:
        raise CacheError(f"dev glance: {exc}") from exc
    if args.plot is not None:
        plot(report, args.plot)
    out(json.dumps(report.as_json()) if args.json else format_report(report))
    return 0


async def _through_nova(
    args: argparse.Namespace, modes: tuple[str, ...], out: Callable[[str], None]
) -> int:
    from .nova import NovaStormPlan, format_nova_report, run_nova_storm

    if args.hosts < 1:
        raise InvalidInput("storm --through nova needs at least one host")
    plan = NovaStormPlan(
        servers=args.deploys,
        images=args.images,
        image_size=args.image_size,
        hosts=args.hosts,
        modes=modes,
        verify=not args.no_verify,
    )
    try:
        report = await asyncio.to_thread(run_nova_storm, plan, args.workdir)
    except DevError as exc:
        raise CacheError(f"nova cloud: {exc}") from exc
    out(json.dumps(report.as_json()) if args.json else format_nova_report(report))
    return 0
