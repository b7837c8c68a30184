"""The storm's conductor: one real Glance, generated images, one child process per job."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pvmcache_async.errors import CacheError
from pvmcache_async.names import CACHE_PREFIX
from pvmcache_async.storage.filevg import probe_reflink

from ..glance import GlanceServer
from . import refs
from .images import upload_images
from .modes import MODES
from .worker import Job, Options

REPEATS = 5  # single deploys and references: the median of this many

# (name, what changes, job kind) for the before/after of each speed choice
INGEST_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("hash on the event loop thread", {"hash_in_thread": False}),
    ("socket-sized chunks (read(n))", {"full_chunks": False}),
    ("dense ingest (zeros written)", {"sparse": False}),
    ("asyncio loop instead of uvloop", {"loop": "asyncio"}),
    ("no early writeback (publish's fsync writes it all)", {"writeback": False}),
    ("room not reserved up front (a hole)", {"preallocate": False}),
]
COLD_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("first deploy cloned after the download (no tee)", {"tee": False}),
]
CLONE_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("full copy (copy_file_range)", {"clone": "copy"}),
    ("clone without early writeback", {"writeback": False}),
]


@dataclass(frozen=True, slots=True)
class StormPlan:
    images: int = 4
    image_size: int = 32 << 20
    deploys: int = 40
    seed: int = 0
    verify: bool = True  # compare every instance disk with its image
    modes: tuple[str, ...] = MODES
    single: bool = True  # cold and warm single deploys, and the physical references
    speed: bool = False  # the before/after of each speed choice (more single deploys)
    warm: int = 5  # warm deploys timed after the cold one (median reported)


@dataclass(slots=True)
class ModeReport:
    mode: str
    deploys: int
    images: int
    glance_requests: int
    glance_bytes: int
    unique_image_bytes: int
    dedup: float  # Glance bytes served / unique image bytes: 1.000 means one download each
    makespan: float
    p50: float
    p95: float
    p99: float
    outcomes: dict[str, int]
    verified_disks: int
    peak_rss_mib: float
    cpu_seconds: float
    chunk_sizes: dict[str, int]  # the most common sizes of the chunks the sink received
    timeline: dict[str, Any] = field(repr=False)
    rss_at_start_mib: float = 0.0  # the child's RSS before the mode ran (interpreter, imports)


@dataclass(slots=True)
class StormReport:
    plan: StormPlan
    machine: dict[str, Any] = field(default_factory=dict)
    modes: list[ModeReport] = field(default_factory=list)
    single: dict[str, Any] = field(default_factory=dict)
    references: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StormReport:
        plan = StormPlan(**{**raw["plan"], "modes": tuple(raw["plan"]["modes"])})
        fields = {k: v for k, v in raw.items() if k not in ("plan", "modes")}
        return cls(plan, modes=[ModeReport(**m) for m in raw["modes"]], **fields)


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def _run_job(job: Job) -> dict[str, Any]:
    """Run one job in a fresh interpreter (its RSS and CPU are then its own), after the
    writes of whatever ran before it have settled."""
    refs.sync_disks()
    proc = subprocess.run(
        [sys.executable, "-m", "pvmcache_dev.storm"],
        input=json.dumps(asdict(job)),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise CacheError(f"storm job {job.mode}/{job.kind} failed (rc={proc.returncode}): {tail}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _counted(glance: GlanceServer, job: Job) -> tuple[dict[str, Any], int, int]:
    before = glance.file_requests(), glance.bytes_served()
    out = _run_job(job)
    return out, glance.file_requests() - before[0], glance.bytes_served() - before[1]


def _machine(root: Path) -> dict[str, Any]:
    fstype = subprocess.run(
        ["df", "--output=fstype", str(root)], capture_output=True, text=True, check=False
    ).stdout.split()[-1:]
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "filesystem": fstype[0] if fstype else "unknown",
        "reflink": probe_reflink(root),
        "fetch_tool": refs.fetch_tool(),
    }


def _mode_report(
    mode: str, out: dict[str, Any], requests: int, served: int, plan: StormPlan
) -> ModeReport:
    latencies = sorted(d[2] for d in out["deploys"])
    outcomes = {k: sum(1 for d in out["deploys"] if d[3] == k) for k in ("miss", "joined", "hit")}
    unique = plan.image_size * plan.images
    return ModeReport(
        mode=mode,
        deploys=len(latencies),
        images=plan.images,
        glance_requests=requests,
        glance_bytes=served,
        unique_image_bytes=unique,
        dedup=served / unique,
        makespan=out["makespan"],
        p50=_percentile(latencies, 50),
        p95=_percentile(latencies, 95),
        p99=_percentile(latencies, 99),
        outcomes=outcomes,
        verified_disks=out["verified_disks"],
        peak_rss_mib=out["peak_rss_mib"],
        cpu_seconds=out["cpu_seconds"],
        chunk_sizes=out["chunk_sizes"],
        timeline={**out["timeline"], "latencies": latencies},
        rss_at_start_mib=out["rss_at_start_mib"],
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_storm_sync(plan: StormPlan, workdir: Path | None = None) -> StormReport:
    with tempfile.TemporaryDirectory(prefix="pvmcache-storm-", dir=workdir) as tmp:
        root = Path(tmp)
        report = StormReport(plan, _machine(root))
        glance = GlanceServer.start(root / "glance")
        try:
            images = upload_images(glance, plan.images, plan.image_size, plan.seed, root)

            def job(mode: str, vg: str, **kw: Any) -> Job:
                base = {"images": images, "deploys": plan.deploys, "verify": plan.verify}
                return Job(mode=mode, glance_url=glance.url, vg=str(root / vg), **{**base, **kw})

            for mode in plan.modes:
                out, requests, served = _counted(glance, job(mode, f"vg-{mode}", kind="storm"))
                report.modes.append(_mode_report(mode, out, requests, served, plan))
                shutil.rmtree(root / f"vg-{mode}", ignore_errors=True)  # disk and page cache
            if plan.single:
                _singles(report, glance, root, images, job)
            _ratios(report)
        finally:
            glance.stop()
        return report


def _singles(
    report: StormReport,
    glance: GlanceServer,
    root: Path,
    images: dict[str, str],
    job: Callable[..., Job],
) -> None:
    """Cold and warm single deploys of the first image, each configuration ``REPEATS`` times
    in turn (round robin, so that a slow moment of the machine hits them all alike); medians."""
    plan = report.plan
    first = dict(list(images.items())[:1])
    one = {"images": first, "deploys": 1, "kind": "single"}
    configs: list[tuple[str, str, dict[str, Any]]] = [("cache", "", {}), ("no-cache", "", {})]
    if plan.speed:
        configs += [("cache", name, change) for name, change in INGEST_VARIANTS + COLD_VARIANTS]
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(configs))}
    vg0 = root / "vg-single-0-0"
    file_url = f"{glance.url}/v2/images/{next(iter(first))}/file"
    measured: list[refs.Reference] = []
    for rep in range(REPEATS):
        for i, (mode, _, change) in enumerate(configs):
            vg = f"vg-single-{i}-{rep}"
            warm = plan.warm if mode == "cache" and i == 0 else 0
            runs[i].append(_run_job(job(mode, vg, warm=warm, options=Options(**change), **one)))
            if (i, rep) != (0, 0):  # keep only the first: the references copy its cache disk
                shutil.rmtree(root / vg, ignore_errors=True)
        cached = sorted(
            vg0.glob(f"{CACHE_PREFIX}*")
        )  # the references in the same rounds, once each
        measured += refs.measure(file_url, plan.image_size, cached[0] if cached else None, root)

    def med(i: int, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[i]))

    cold = runs[0][0]
    report.single = {
        "image_size": plan.image_size,
        "repeats": REPEATS,
        "cache_cold_seconds": med(0, "cold_seconds"),
        "cache_ensure_seconds": med(0, "ensure_seconds"),
        "cache_warm_seconds": med(0, "warm_seconds"),
        "no_cache_seconds": med(1, "cold_seconds"),
        "ingest_chunk_sizes": cold["chunk_sizes"],
        "ingest_peak_rss_mib": max(r["peak_rss_mib"] for r in runs[0]),
    }
    for name in dict.fromkeys(r.name for r in measured):
        same = [r for r in measured if r.name == name]
        ref = replace(same[0], seconds=statistics.median(r.seconds for r in same))
        report.references.append({**asdict(ref), "mib_s": ref.mib_s})
    if cached:
        report.single["cache_disk_allocated_bytes"] = os.stat(cached[0]).st_blocks * 512
    if not plan.speed:
        return
    cold_names = {name for name, _ in COLD_VARIANTS}
    for i, (_, name, _) in enumerate(configs[2:], start=2):
        if name in cold_names:
            report.speed.append(
                {
                    "choice": name,
                    "measure": "cold single deploy seconds",
                    "without": med(i, "cold_seconds"),
                    "with": report.single["cache_cold_seconds"],
                }
            )
            continue
        report.speed.append(
            {
                "choice": name,
                "measure": "cold ingest seconds (ensure)",
                "without": med(i, "ensure_seconds"),
                "with": report.single["cache_ensure_seconds"],
                "chunk_sizes_without": runs[i][0]["chunk_sizes"],
            }
        )
    for name, change in CLONE_VARIANTS:  # warm clones of the image already cached in vg0
        warm_runs = [
            _run_job(job("cache", vg0.name, warm=plan.warm, options=Options(**change), **one))
            for _ in range(REPEATS)
        ]
        report.speed.append(
            {
                "choice": name,
                "measure": "warm deploy seconds (median)",
                "without": statistics.median(r["warm_seconds"] for r in warm_runs),
                "with": report.single["cache_warm_seconds"],
            }
        )


def _ratios(report: StormReport) -> None:
    by = {m.mode: m for m in report.modes}
    refs_by = {r["name"]: r for r in report.references}
    s = report.single
    r: dict[str, float | None] = {}
    if "cache" in by:
        r["cache_dedup"] = by["cache"].dedup
        if "no-cache" in by:
            r["makespan_no_cache_over_cache"] = _ratio(
                by["no-cache"].makespan, by["cache"].makespan
            )
        if "per-image-lock" in by:
            r["makespan_per_image_lock_over_cache"] = _ratio(
                by["per-image-lock"].makespan, by["cache"].makespan
            )
    if s:
        tee = refs_by.get("fetch_write_verify")
        if tee:  # throughput ratio: same bytes, so the inverse ratio of the times
            r["cold_ingest_over_fetch_write_verify"] = _ratio(
                tee["seconds"], s["cache_ensure_seconds"]
            )
        for name in ("copy", "copy_sync"):
            if name in refs_by:
                r[f"warm_deploy_over_{name}"] = _ratio(
                    s["cache_warm_seconds"], refs_by[name]["seconds"]
                )
        r["cold_single_over_no_cache"] = _ratio(s["cache_cold_seconds"], s["no_cache_seconds"])
    report.ratios = r


async def run_storm(plan: StormPlan, workdir: Path | None = None) -> StormReport:
    """Run the storm against a Glance of its own, in ``workdir`` (a temp dir by default)."""
    return await asyncio.to_thread(run_storm_sync, plan, workdir)
