"""Deploy storms: the benchmark and stress test behind ``pvmcache-async storm``.

Starts a real Glance on loopback (``devglance``), uploads generated raw images shaped like
disk images (random blocks between long zero runs), then runs many deploys at once spread
over them into a fresh file VG, and reports what Glance served, latencies and resources.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import resource
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .devglance import GlanceServer
from .glance import GlanceClient
from .storage.filevg import FileVG
from .transfer import CacheSettings, ImageCache

MODES = ("cache",)
_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class StormPlan:
    images: int = 4
    image_size: int = 32 << 20
    deploys: int = 40
    seed: int = 0
    verify: bool = True  # compare every instance disk with its image


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


@dataclass(slots=True)
class StormReport:
    plan: StormPlan
    modes: list[ModeReport] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"plan": asdict(self.plan), "modes": [asdict(m) for m in self.modes]}


def make_image_file(path: Path, size: int, seed: int) -> str:
    """Write a disk-like raw image; return its sha256 (to check the deployed disks)."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(_BLOCK, left)
            block = rng.randbytes(n) if rng.random() < 0.5 else bytes(n)
            f.write(block)
            digest.update(block)
            left -= n
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK * 4):
            digest.update(chunk)
    return digest.hexdigest()


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def _cache_mode(
    glance: GlanceServer, vg_dir: Path, images: dict[str, str], plan: StormPlan
) -> ModeReport:
    ids = list(images)
    cache = ImageCache(FileVG(vg_dir), GlanceClient(glance.url), CacheSettings())
    before = {i: (glance.file_requests(i), glance.bytes_served(i)) for i in ids}
    cpu0 = time.process_time()
    start = time.monotonic()
    try:
        jobs = [cache.deploy(ids[n % len(ids)], str(uuid.uuid4())) for n in range(plan.deploys)]
        results = await asyncio.gather(*jobs)
    finally:
        await cache.close()
    makespan = time.monotonic() - start
    cpu = time.process_time() - cpu0
    requests = sum(glance.file_requests(i) - before[i][0] for i in ids)
    served = sum(glance.bytes_served(i) - before[i][1] for i in ids)
    verified = 0
    if plan.verify:
        for r in results:
            actual = await asyncio.to_thread(_sha256_file, vg_dir / r.disk)
            if actual != images[r.image_id]:
                raise AssertionError(f"instance disk {r.disk} differs from image {r.image_id}")
            verified += 1
    latencies = sorted(r.seconds for r in results)
    outcomes = {k: sum(1 for r in results if r.result == k) for k in ("miss", "joined", "hit")}
    unique = plan.image_size * len(ids)
    return ModeReport(
        mode="cache",
        deploys=len(results),
        images=len(ids),
        glance_requests=requests,
        glance_bytes=served,
        unique_image_bytes=unique,
        dedup=served / unique,
        makespan=makespan,
        p50=_percentile(latencies, 50),
        p95=_percentile(latencies, 95),
        p99=_percentile(latencies, 99),
        outcomes=outcomes,
        verified_disks=verified,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        cpu_seconds=cpu,
    )


async def run_storm(plan: StormPlan, workdir: Path | None = None) -> StormReport:
    """Run the storm against a Glance of its own, in ``workdir`` (a temp dir by default)."""
    with tempfile.TemporaryDirectory(prefix="pvmcache-storm-", dir=workdir) as tmp:
        root = Path(tmp)
        glance = await asyncio.to_thread(GlanceServer.start, root / "glance")
        try:
            images: dict[str, str] = {}
            for n in range(plan.images):
                path = root / f"image{n}.raw"
                sha = await asyncio.to_thread(make_image_file, path, plan.image_size, plan.seed + n)
                image_id = await asyncio.to_thread(glance.create_image, path, name=f"storm-{n}")
                path.unlink()
                images[image_id] = sha
            report = StormReport(plan)
            report.modes.append(await _cache_mode(glance, root / "vg-cache", images, plan))
            return report
        finally:
            await asyncio.to_thread(glance.stop)


def format_report(report: StormReport) -> str:
    p = report.plan
    lines = [
        f"deploy storm: {p.deploys} deploys over {p.images} images of "
        f"{p.image_size / (1 << 20):.0f} MiB, one real Glance on loopback, one file VG",
        "",
        f"{'mode':8} {'deploys':>7} {'glance GETs':>11} {'served/unique':>13} {'makespan':>9} "
        f"{'p50':>7} {'p95':>7} {'p99':>7} {'miss/joined/hit':>15} {'peak RSS':>9} {'CPU':>7}",
    ]
    for m in report.modes:
        o = m.outcomes
        lines.append(
            f"{m.mode:8} {m.deploys:>7} {m.glance_requests:>11} {m.dedup:>13.3f} "
            f"{m.makespan:>8.2f}s {m.p50:>6.2f}s {m.p95:>6.2f}s {m.p99:>6.2f}s "
            f"{o['miss']:>5}/{o['joined']}/{o['hit']:<5} "
            f"{m.peak_rss_mib:>6.0f}MiB {m.cpu_seconds:>6.2f}s"
        )
    for m in report.modes:
        if m.verified_disks:
            lines.append(f"{m.mode}: {m.verified_disks} instance disks verified byte-identical")
    return "\n".join(lines)
