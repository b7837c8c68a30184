"""One storm job, run in a child process of its own so its peak RSS and CPU are its own.

``python -m pvmcache_dev.storm`` reads a :class:`Job` as JSON on stdin and prints its
result as JSON on stdout. The three ways of deploying:

* ``cache``: this product (``ImageCache.deploy``), asyncio.
* ``no-cache``: each deploy streams its image from Glance into its own disk, verified by the
  same client (length and digest), asyncio: what a host does without an image cache.
* ``per-image-lock``: the nova-powervm design: an OS thread per deploy, a ``threading.Lock``
  per image around check-or-download, then a full copy of the cached file per deploy.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pvmcache_async.core.direct import stream_disk
from pvmcache_async.glance.client import DownloadTuning, GlanceClient
from pvmcache_async.models import ImageInfo
from pvmcache_async.names import cache_disk_names, instance_disk_name, partial_disk_name
from pvmcache_async.storage.base import Sink
from pvmcache_async.storage.filevg import CloneMethod, FileVG, FileVGSettings
from pvmcache_async.transfer import CacheSettings, ImageCache

from .images import sha256_file

BUCKET = 0.05  # seconds per bar of the bytes-downloaded timeline
_BLOCK = 4 << 20


@dataclass(slots=True)
class Options:
    """The speed switches, so one run can measure each before and after."""

    loop: str = "uvloop"  # or "asyncio"
    sparse: bool = True  # sparse ingest in the file VG
    clone: CloneMethod = "auto"  # FICLONE, else hole-aware copy
    full_chunks: bool = True  # glance.DownloadTuning.full_chunks
    hash_in_thread: bool = True  # glance.DownloadTuning.hash_in_thread
    max_clones: int | None = None  # CacheSettings.max_clones (None: the product's default)
    tee: bool = True  # CacheSettings.tee: a cold deploy's disk written during the download
    writeback: bool = True  # FileVGSettings.writeback: each chunk's writeback started as it lands
    preallocate: bool = True  # FileVGSettings.preallocate: a partial disk's room taken up front


@dataclass(slots=True)
class Job:
    mode: str  # "cache", "no-cache", "per-image-lock"
    kind: str  # "storm": all deploys at once; "single": one cold deploy, then warm ones
    glance_url: str
    images: dict[str, str]  # image id -> sha256 of its data
    deploys: int
    vg: str
    verify: bool = True
    warm: int = 0  # single, cache mode: sequential warm deploys after the cold one
    options: Options = field(default_factory=Options)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        return cls(**{**raw, "options": Options(**raw.get("options", {}))})


class Tracer:
    """Bytes downloaded over time, disks completed, and the sizes of the chunks that came."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.buckets: list[int] = []
        self.done: list[float] = []
        self.chunks: Counter[int] = Counter()
        self._lock = threading.Lock()

    def got(self, n: int) -> None:
        with self._lock:
            b = int((time.monotonic() - self.start) / BUCKET)
            if b >= len(self.buckets):
                self.buckets.extend([0] * (b + 1 - len(self.buckets)))
            self.buckets[b] += n
            self.chunks[n] += 1

    def disk_done(self) -> None:
        with self._lock:
            self.done.append(time.monotonic() - self.start)


class _CountingSink:
    def __init__(self, inner: Sink, tracer: Tracer) -> None:
        self._inner, self._tracer = inner, tracer

    async def write(self, chunk: bytes) -> None:
        self._tracer.got(len(chunk))
        await self._inner.write(chunk)

    async def rewind(self) -> None:
        await self._inner.rewind()


class TracingGlance(GlanceClient):
    def __init__(self, job: Job, tracer: Tracer) -> None:
        o = job.options
        tuning = DownloadTuning(full_chunks=o.full_chunks, hash_in_thread=o.hash_in_thread)
        super().__init__(job.glance_url, tuning=tuning)
        self.tracer = tracer

    async def download(self, image: ImageInfo, sink: Sink) -> int:
        return await super().download(image, _CountingSink(sink, self.tracer))


def _settings(job: Job) -> CacheSettings:
    if job.options.max_clones is None:
        return CacheSettings(tee=job.options.tee)
    return CacheSettings(max_clones=job.options.max_clones, tee=job.options.tee)


def _vg(job: Job, root: Path | None = None) -> FileVG:
    root = Path(job.vg) if root is None else root
    o = job.options
    settings = FileVGSettings(
        sparse=o.sparse, clone_method=o.clone, writeback=o.writeback, preallocate=o.preallocate
    )
    return FileVG(root, settings)


def _plan(job: Job) -> list[tuple[str, str]]:
    ids = list(job.images)
    return [(ids[n % len(ids)], str(uuid.uuid4())) for n in range(job.deploys)]


async def _cache_storm(job: Job, tracer: Tracer) -> dict[str, Any]:
    cache = ImageCache(_vg(job), TracingGlance(job, tracer), _settings(job))

    async def one(image_id: str, inst: str) -> tuple[str, str, float, str]:
        r = await cache.deploy(image_id, inst)
        tracer.disk_done()
        return image_id, r.disk, r.seconds, r.outcome.value

    try:
        done = await asyncio.gather(*(one(i, inst) for i, inst in _plan(job)))
    finally:
        await cache.close()
    return {"deploys": [list(d) for d in done]}


async def _no_cache_one(
    glance: GlanceClient, vg: FileVG, image_id: str, inst: str
) -> tuple[str, str, float, str]:
    start = time.monotonic()
    disk, _ = await stream_disk(glance, vg, image_id, inst)
    return image_id, disk, time.monotonic() - start, "miss"


async def _no_cache_storm(job: Job, tracer: Tracer) -> dict[str, Any]:
    glance, vg = TracingGlance(job, tracer), _vg(job)

    async def one(image_id: str, inst: str) -> tuple[str, str, float, str]:
        r = await _no_cache_one(glance, vg, image_id, inst)
        tracer.disk_done()
        return r

    try:
        done = await asyncio.gather(*(one(i, inst) for i, inst in _plan(job)))
    finally:
        await glance.close()
    return {"deploys": [list(d) for d in done]}


def _http_download(url: str, image_id: str, dest: Path, tracer: Tracer) -> None:
    """What a thread of nova-compute does: GET the record, stream the file, check sha512."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("GET", f"/v2/images/{image_id}")
        record = json.loads(conn.getresponse().read())
        conn.request("GET", f"/v2/images/{image_id}/file")
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"image {image_id}: Glance answered HTTP {resp.status}")
        hasher = hashlib.new(record["os_hash_algo"])
        with open(dest, "wb") as f:
            while chunk := resp.read(_BLOCK):
                tracer.got(len(chunk))
                hasher.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if hasher.hexdigest() != record["os_hash_value"]:
            raise RuntimeError(f"image {image_id}: checksum mismatch")
    finally:
        conn.close()


def _lock_storm(job: Job, tracer: Tracer) -> dict[str, Any]:
    root = Path(job.vg)
    root.mkdir(parents=True, exist_ok=True)
    locks = {i: threading.Lock() for i in job.images}

    def one(image_id: str, inst: str) -> tuple[str, str, float, str]:
        start = time.monotonic()
        cached = root / next(cache_disk_names(image_id))
        result = "hit"
        with locks[image_id]:  # check-or-download, one thread at a time per image
            if not cached.exists():
                part = root / partial_disk_name()
                _http_download(job.glance_url, image_id, part, tracer)
                part.rename(cached)
                result = "miss"
        disk = instance_disk_name(inst)
        shutil.copyfile(cached, root / disk)  # a full copy per deploy
        with open(root / disk, "rb+") as f:
            os.fsync(f.fileno())
        tracer.disk_done()
        return image_id, disk, time.monotonic() - start, result

    plan = _plan(job)
    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        done = list(pool.map(lambda p: one(*p), plan))
    return {"deploys": [list(d) for d in done]}


async def _single(job: Job, tracer: Tracer) -> dict[str, Any]:
    """The ingest alone (``ensure``, into a VG of its own, removed after), then one cold
    deploy of the first image, then ``warm`` warm ones."""
    image_id = next(iter(job.images))
    if job.mode == "no-cache":
        glance, vg = TracingGlance(job, tracer), _vg(job)
        try:
            _, disk, seconds, _ = await _no_cache_one(glance, vg, image_id, str(uuid.uuid4()))
        finally:
            await glance.close()
        return {"deploys": [[image_id, disk, seconds, "miss"]], "cold_seconds": seconds}
    ingest_vg = Path(f"{job.vg}-ingest")
    cache = ImageCache(_vg(job, ingest_vg), TracingGlance(job, tracer), _settings(job))
    try:
        ensured = await cache.ensure(image_id)
    finally:
        await cache.close()
        shutil.rmtree(ingest_vg, ignore_errors=True)
    cache = ImageCache(_vg(job), TracingGlance(job, tracer), _settings(job))
    try:
        first = await cache.deploy(image_id, str(uuid.uuid4()))
        deploys = [[image_id, first.disk, first.seconds, first.outcome.value]]
        warm = []
        for _ in range(job.warm):
            r = await cache.deploy(image_id, str(uuid.uuid4()))
            warm.append(r.seconds)
            deploys.append([image_id, r.disk, r.seconds, r.outcome.value])
    finally:
        await cache.close()
    return {
        "deploys": deploys,
        "cold_seconds": first.seconds,
        "ensure_seconds": ensured.seconds,
        "ensure_result": ensured.outcome.value,
        "warm_seconds": statistics.median(warm) if warm else None,
    }


def _rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident set size, in MiB.

    Not ``getrusage``: Linux carries ``ru_maxrss`` over ``execve``, so a child would report
    its parent's peak if that was higher.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_job(job: Job) -> dict[str, Any]:
    rss_before = _rss_mib("VmRSS")
    tracer = Tracer()
    cpu0, t0 = _cpu(), time.monotonic()
    if job.mode == "per-image-lock":
        if job.kind != "storm":
            raise ValueError("per-image-lock runs storms only")
        out = _lock_storm(job, tracer)
    else:
        runner = {"storm": _cache_storm if job.mode == "cache" else _no_cache_storm}
        coro = _single(job, tracer) if job.kind == "single" else runner["storm"](job, tracer)
        factory = asyncio.new_event_loop
        if job.options.loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as r:
            out = r.run(coro)
    out["makespan"] = time.monotonic() - t0
    out["cpu_seconds"] = _cpu() - cpu0
    out["peak_rss_mib"] = _rss_mib()
    out["rss_at_start_mib"] = rss_before
    out["timeline"] = {"bucket": BUCKET, "bytes": tracer.buckets, "disks": sorted(tracer.done)}
    out["chunk_sizes"] = {str(k): v for k, v in tracer.chunks.most_common(6)}
    out["options"] = asdict(job.options)
    verified = 0
    if job.verify:  # after the measurements: reading the disks back is not the storm's cost
        for image_id, disk, _, _ in out["deploys"]:
            if sha256_file(Path(job.vg) / disk) != job.images[image_id]:
                raise RuntimeError(f"instance disk {disk} differs from image {image_id}")
            verified += 1
    out["verified_disks"] = verified
    return out


def main() -> int:
    job = Job.from_json(json.load(sys.stdin))
    json.dump(run_job(job), sys.stdout)
    return 0
