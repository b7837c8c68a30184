"""``--plot FILE.png``: deploy latency per mode, and bytes downloaded / disks done over time.

matplotlib is an optional extra (``pip install -e '.[bench]'``); it is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pvmcache_async.errors import InvalidInput

from .run import StormReport


def pyplot() -> Any:
    """matplotlib.pyplot (headless), or a clear error when the bench extra is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInput(
            "--plot needs matplotlib: install the bench extra (pip install -e '.[bench]')"
        ) from None
    return plt


def plot(report: StormReport, path: Path) -> None:
    plt = pyplot()
    fig, (lat, tl) = plt.subplots(1, 2, figsize=(13, 5))
    disks: Any = tl.twinx()
    for m in report.modes:
        t = m.timeline
        done = sorted(t["disks"])
        lat.plot(sorted(t["latencies"]), label=m.mode)
        mib, total = [], 0
        for b in t["bytes"]:
            total += b
            mib.append(total / (1 << 20))
        xs = [i * t["bucket"] for i in range(len(mib))]
        (line,) = tl.plot(xs, mib, label=f"{m.mode}: MiB downloaded")
        disks.step(done, range(1, len(done) + 1), where="post", linestyle="--",
                   color=line.get_color(), label=f"{m.mode}: disks done")  # fmt: skip
    lat.set(title="deploy latency by rank", xlabel="deploy (sorted)", ylabel="seconds")
    lat.legend()
    tl.set(title="timeline", xlabel="seconds since start", ylabel="MiB downloaded (log scale)")
    tl.set_yscale("symlog", linthresh=1.0)  # one download per image next to one per deploy
    disks.set_ylabel("instance disks completed (dashed)")
    tl.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
