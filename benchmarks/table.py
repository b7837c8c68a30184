"""Print a storm's JSON (``pvmcache-async storm --json``) as tables.

python benchmarks/table.py storm.json          the storm's own table
python benchmarks/table.py --rss a.json b.json  peak RSS of the cache mode per image size
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pvmcache_dev.storm import StormReport, format_report


def main(argv: list[str]) -> int:
    if argv[:1] == ["--rss"]:
        rows = []
        for path in argv[1:]:
            report = StormReport.from_json(json.loads(Path(path).read_text()))
            for m in report.modes:
                rows.append((report.plan.image_size, m))
        rows.sort(key=lambda r: r[0])
        print(f"{'image size':>10} {'deploys':>7} {'GETs':>5} {'served/unique':>13} "
              f"{'makespan':>9} {'peak RSS':>9} {'vs smallest':>11}")  # fmt: skip
        base = rows[0][1].peak_rss_mib if rows else 1.0
        for size, m in rows:
            print(
                f"{size / (1 << 20):>7.0f}MiB {m.deploys:>7} {m.glance_requests:>5} "
                f"{m.dedup:>13.3f} {m.makespan:>8.2f}s {m.peak_rss_mib:>6.1f}MiB "
                f"{m.peak_rss_mib / base:>11.3f}"
            )
        return 0
    print(format_report(StormReport.from_json(json.loads(Path(argv[0]).read_text()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
