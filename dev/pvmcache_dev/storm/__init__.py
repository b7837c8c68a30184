"""Deploy storms: the benchmark and stress test behind ``pvmcache-async storm``.

Starts a real Glance on loopback (``pvmcache_dev.glance``), uploads generated raw images shaped like
disk images (random blocks between long zero runs), then runs many deploys at once spread
over them, in each mode (``cache``, ``no-cache``, ``per-image-lock``) in a child process of
its own, into a fresh file VG per mode, and reports what Glance served, latencies, peak RSS
and CPU, with same-run references (curl, tee | sha512sum, cp --sparse=always) and ratios.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .modes import MODES, NOVA_MODES

if TYPE_CHECKING:
    from .report import format_report
    from .run import ModeReport, StormPlan, StormReport, run_storm, run_storm_sync

_LAZY = {
    "format_report": "report",
    "ModeReport": "run",
    "StormPlan": "run",
    "StormReport": "run",
    "run_storm": "run",
    "run_storm_sync": "run",
}


def __getattr__(name: str) -> Any:
    """The conductor's names, imported on first use: ``storm.modes`` alone stays light."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "MODES",
    "NOVA_MODES",
    "ModeReport",
    "StormPlan",
    "StormReport",
    "format_report",
    "run_storm",
    "run_storm_sync",
]
