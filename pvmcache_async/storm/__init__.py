"""Deploy storms: the benchmark and stress test behind ``pvmcache-async storm``.

Starts a real Glance on loopback (``devglance``), uploads generated raw images shaped like
disk images (random blocks between long zero runs), then runs many deploys at once spread
over them, in each mode (``cache``, ``no-cache``, ``per-image-lock``) in a child process of
its own, into a fresh file VG per mode, and reports what Glance served, latencies, peak RSS
and CPU, with same-run references (curl, tee | sha512sum, cp --sparse=always) and ratios.
"""

from .report import format_report
from .run import MODES, ModeReport, StormPlan, StormReport, run_storm, run_storm_sync

__all__ = [
    "MODES",
    "ModeReport",
    "StormPlan",
    "StormReport",
    "format_report",
    "run_storm",
    "run_storm_sync",
]
