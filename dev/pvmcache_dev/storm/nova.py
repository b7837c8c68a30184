"""The storm through nova: servers booted at once through nova's API on a real nova cloud.

One real Glance holds generated images; for each mode a fresh nova cloud (``nova_cloud``) boots
``servers`` servers spread over the images, one multi-create request per image, all sent at
once, and the servers are polled until every one is ACTIVE or ERROR. Modes:

* ``cache``: ``[pvmcache] enabled = True`` on every host (this product);
* ``no-cache``: the driver streams each server's image from Glance itself;
* ``nova``: the cache on, every image already cached on every host before the boot: what nova
  itself costs (API, scheduler, conductor, RPC, the builds) with no image to move.

The time the images cost in a mode is its time to all ACTIVE minus the ``nova`` mode's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pvmcache_async.errors import CacheError
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.names import CLONE_PREFIX, PARTIAL_PREFIX, instance_disk_name
from pvmcache_async.storage import open_vg
from pvmcache_async.transfer import ImageCache

from ..glance import GlanceServer
from ..nova_cloud import DEFAULT_DRIVER, FLAVOR_DISK_GB, NovaAPI, NovaCloud
from .images import sha256_file, upload_images, zeros_from
from .modes import NOVA_MODES
from .run import _machine, _percentile

_POLL = 0.25  # seconds between two looks at the servers' states


@dataclass(frozen=True, slots=True)
class NovaStormPlan:
    servers: int = 60
    images: int = 2
    image_size: int = 256 << 20
    hosts: int = 3
    modes: tuple[str, ...] = NOVA_MODES
    seed: int = 0
    verify: bool = True  # compare every instance disk with its image (after the timing)
    timeout: float = 1800.0  # for all servers of a mode to be ACTIVE or ERROR
    compute_driver: str = DEFAULT_DRIVER


@dataclass(slots=True)
class NovaModeReport:
    mode: str
    servers: int
    active: int
    errors: int
    all_active: float  # seconds from the first POST until the last server is ACTIVE
    p50: float
    p95: float
    p99: float
    glance_requests: int
    glance_bytes: int
    hosts_x_images: int  # the GETs the cache should make: one per image on each host used
    servers_per_host: dict[str, int]
    compute_peak_rss_mib: dict[str, float]
    disks: int  # instance disks found in the VGs, of the image's size
    verified_disks: int  # ... and byte-identical to their image
    leftovers: list[str]  # partial or temporary disks left in any VG
    latencies: list[float] = field(repr=False)


@dataclass(slots=True)
class NovaStormReport:
    plan: NovaStormPlan
    machine: dict[str, Any] = field(default_factory=dict)
    modes: list[NovaModeReport] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def hosts_of(plan: NovaStormPlan) -> list[str]:
    return [f"compute{n}" for n in range(1, plan.hosts + 1)]


async def _prefetch(glance_url: str, vgs: list[Path], image_ids: list[str]) -> None:
    for vg in vgs:
        cache = ImageCache(open_vg(f"file:{vg}"), GlanceClient(glance_url))
        try:
            await asyncio.gather(*(cache.ensure(i) for i in image_ids))
        finally:
            await cache.close()


def prefetch(cloud: NovaCloud, glance_url: str, image_ids: list[str]) -> None:
    """Cache every image on every host of ``cloud`` (what the ``nova`` mode starts from)."""
    assert cloud.state is not None
    vgs = [cloud.vg_path(h) for h in cloud.state.hosts]
    asyncio.run(_prefetch(glance_url, vgs, image_ids))


def _reset_peak_rss(pid: int) -> None:
    with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM to the current RSS
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def boot_storm(
    cloud: NovaCloud,
    glance: GlanceServer,
    images: dict[str, str],
    servers: int,
    *,
    mode: str,
    label: str,
    verify: bool = True,
    timeout: float = 1800.0,
) -> NovaModeReport:
    """Boot ``servers`` servers over ``images`` at once through nova's API and measure."""
    assert cloud.state is not None
    hosts = cloud.state.hosts
    api = cloud.api
    for host in hosts:
        _reset_peak_rss(cloud.compute_pid(host))
    before = glance.file_requests(), glance.bytes_served()
    ids = list(images)
    counts = [servers // len(ids) + (1 if n < servers % len(ids) else 0) for n in range(len(ids))]
    failures: list[BaseException] = []

    def post(n: int) -> None:
        try:
            api.boot(f"{label}-{n}-", ids[n], counts[n])
        except BaseException as exc:  # reported below, in this thread
            failures.append(exc)

    start = time.monotonic()
    posts = [threading.Thread(target=post, args=(n,)) for n in range(len(ids)) if counts[n]]
    for t in posts:
        t.start()
    for t in posts:
        t.join()
    if failures:
        raise CacheError(f"nova storm {mode}: boot request failed: {failures[0]}")
    done: dict[str, float] = {}
    errors: set[str] = set()
    rounds = 0
    while len(done) + len(errors) < servers:
        if time.monotonic() - start > timeout:
            raise CacheError(
                f"nova storm {mode}: {len(done)} ACTIVE, {len(errors)} ERROR of {servers} "
                f"after {timeout:.0f}s"
            )
        now = time.monotonic() - start
        for sid in api.server_ids(f"{label}-", "ACTIVE") - done.keys():
            done[sid] = now
        if rounds % 4 == 0 or len(done) + len(errors) >= servers - 4:
            errors = api.server_ids(f"{label}-", "ERROR")
        rounds += 1
        time.sleep(_POLL)
    requests = glance.file_requests() - before[0]
    served = glance.bytes_served() - before[1]
    rss = {h: cloud.peak_rss_mib(f"compute-{h}") for h in hosts}
    where = {sid: host for sid, host in api.hosts_of_servers().items() if sid in done}
    per_host = {h: sum(1 for x in where.values() if x == h) for h in hosts}
    image_of = _images_of_servers(api, label, ids, counts)
    disks, verified = _check_disks(cloud, glance, where, image_of, images, verify)
    latencies = sorted(done.values())
    used = {(where[s], image_of[s]) for s in where if s in image_of}
    return NovaModeReport(
        mode=mode,
        servers=servers,
        active=len(done),
        errors=len(errors),
        all_active=max(latencies) if latencies else 0.0,
        p50=_percentile(latencies, 50) if latencies else 0.0,
        p95=_percentile(latencies, 95) if latencies else 0.0,
        p99=_percentile(latencies, 99) if latencies else 0.0,
        glance_requests=requests,
        glance_bytes=served,
        hosts_x_images=len(used),
        servers_per_host=per_host,
        compute_peak_rss_mib=rss,
        disks=disks,
        verified_disks=verified,
        leftovers=leftovers(cloud),
        latencies=latencies,
    )


def _images_of_servers(
    api: NovaAPI, label: str, ids: list[str], counts: list[int]
) -> dict[str, str]:
    """Server id -> its image, from the names each request gave (``LABEL-N-...``)."""
    image_of: dict[str, str] = {}
    for n, image in enumerate(ids):
        if counts[n]:  # the trailing dash keeps LABEL-1- from matching LABEL-10-
            image_of.update(dict.fromkeys(api.server_ids(f"{label}-{n}-"), image))
    return image_of


def _check_disks(
    cloud: NovaCloud,
    glance: GlanceServer,
    where: dict[str, str],
    image_of: dict[str, str],
    images: dict[str, str],
    verify: bool,
) -> tuple[int, int]:
    """(disks of the right size, disks byte-identical to their image then zeros) of the ACTIVE
    servers. A server's disk is its flavor's root disk, ``FLAVOR_DISK_GB``, as nova accounts it."""
    found = verified = 0
    sizes = {image: int(str(glance.image(image)["size"])) for image in images}
    for sid, host in where.items():
        path = cloud.vg_path(host) / instance_disk_name(sid)
        image = image_of.get(sid)
        if image is None or not path.exists() or path.stat().st_size != FLAVOR_DISK_GB << 30:
            continue
        found += 1
        size = sizes[image]
        if verify and sha256_file(path, size) == images[image] and zeros_from(path, size):
            verified += 1
    return found, verified


def leftovers(cloud: NovaCloud) -> list[str]:
    """Partial (``p_``) and clone temporary (``t_``) disks in any host's VG, as HOST/NAME."""
    assert cloud.state is not None
    return sorted(
        f"{host}/{p.name}"
        for host in cloud.state.hosts
        for p in (cloud.vg_path(host).iterdir() if cloud.vg_path(host).exists() else [])
        if p.name.startswith((PARTIAL_PREFIX, CLONE_PREFIX))
    )


def run_nova_storm(plan: NovaStormPlan, workdir: Path | None = None) -> NovaStormReport:
    """Each mode on a fresh nova cloud against one Glance; clouds under ``workdir``."""
    unknown = sorted(set(plan.modes) - set(NOVA_MODES))
    if unknown or not plan.modes:
        raise CacheError(f"unknown nova storm mode {unknown}: choose from {NOVA_MODES}")
    # rabbitmq and mysql run as their own users: the tree must be traversable by them
    tmp = Path(tempfile.mkdtemp(prefix="pvmcache-nova-storm-", dir=workdir))
    tmp.chmod(0o755)
    report = NovaStormReport(plan, _machine(tmp))
    glance = GlanceServer.start(tmp / "glance", workers=2, threads=8)
    try:
        images = upload_images(
            glance, plan.images, plan.image_size, plan.seed, tmp, name="nova-storm"
        )
        for mode in plan.modes:
            cloud = NovaCloud(tmp / f"cloud-{mode}")
            try:
                cloud.up(
                    hosts=hosts_of(plan),
                    compute_driver=plan.compute_driver,
                    cache_enabled=mode != "no-cache",
                    glance_url=glance.url,
                )
                if mode == "nova":
                    prefetch(cloud, glance.url, list(images))
                os.sync()  # the uploads' and earlier modes' writes are not billed to this one
                report.modes.append(
                    boot_storm(
                        cloud, glance, images, plan.servers, mode=mode, label=f"storm-{mode}",
                        verify=plan.verify, timeout=plan.timeout,
                    )
                )  # fmt: skip
            finally:
                cloud.down()
        _ratios(report)
    finally:
        glance.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _ratios(report: NovaStormReport) -> None:
    by = {m.mode: m for m in report.modes}
    r: dict[str, float | None] = {}
    if "cache" in by:
        c = by["cache"]
        r["cache_gets_over_hosts_x_images"] = c.glance_requests / max(c.hosts_x_images, 1)
    if "nova" in by:
        own = by["nova"].all_active
        r["nova_own_seconds"] = own
        cost = {m: by[m].all_active - own for m in ("cache", "no-cache") if m in by}
        for m, value in cost.items():
            r[f"image_seconds_{m.replace('-', '_')}"] = value
        if len(cost) == 2:
            r["image_seconds_no_cache_over_cache"] = (
                cost["no-cache"] / cost["cache"] if cost["cache"] > 0 else None
            )
    if "cache" in by and "no-cache" in by and by["cache"].all_active:
        r["all_active_no_cache_over_cache"] = by["no-cache"].all_active / by["cache"].all_active
    report.ratios = r


def format_nova_report(report: NovaStormReport) -> str:
    p = report.plan
    m = report.machine
    lines = [
        f"storm through nova: {p.servers} servers over {p.images} images of "
        f"{p.image_size / (1 << 20):.0f} MiB on {p.hosts} hosts (nova-compute each, file VG), "
        "one real Glance; a fresh nova cloud per mode",
        f"machine: {m.get('cpus')} CPUs, {m.get('filesystem')}, kernel {m.get('kernel')}, "
        f"Python {m.get('python')}",
        "",
        f"{'mode':9} {'ACTIVE':>6} {'ERROR':>5} {'all ACTIVE':>10} {'p50':>7} {'p95':>7} "
        f"{'p99':>7} {'GETs':>5} {'hosts x images':>14} {'GiB served':>10} "
        f"{'compute peak RSS (MiB)':>24}",
    ]
    for r in report.modes:
        rss = "/".join(f"{v:.0f}" for v in r.compute_peak_rss_mib.values())
        lines.append(
            f"{r.mode:9} {r.active:>6} {r.errors:>5} {r.all_active:>9.2f}s {r.p50:>6.2f}s "
            f"{r.p95:>6.2f}s {r.p99:>6.2f}s {r.glance_requests:>5} {r.hosts_x_images:>14} "
            f"{r.glance_bytes / (1 << 30):>10.2f} {rss:>24}"
        )
    for r in report.modes:
        spread = ", ".join(f"{h} {n}" for h, n in r.servers_per_host.items())
        check = f"{r.verified_disks} verified byte-identical" if p.verify else "not verified"
        left = ", ".join(r.leftovers) or "none"
        lines.append(
            f"{r.mode}: servers per host {spread}; {r.disks} instance disks ({check}); "
            f"partial/temporary disks left: {left}"
        )
    if report.ratios:
        lines += ["", "same-run figures:"]
        for name, value in report.ratios.items():
            lines.append(f"  {name:38} {'n/a' if value is None else f'{value:8.3f}'}")
    return "\n".join(lines)
