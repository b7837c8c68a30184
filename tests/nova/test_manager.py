"""nova's image cache manager for the cache, against the real nova, its database and Glance."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from nova import objects
from nova.compute import vm_states
from nova.virt import imagecache

from pvmcache_async import CacheEntry, EntryState, ImageCache
from pvmcache_async.core.index import Index
from pvmcache_async.driver_hook import DriverHook, ImageManager
from pvmcache_async.locks import FileLock
from pvmcache_async.names import cache_disk_names, partial_disk_name
from pvmcache_async.storage.filevg import FileVG
from pvmcache_dev.glance import GlanceServer

from ..support import disk_image, vg_files
from .nova_support import CONF, age, destroy_all, host_instances, make_instance

pytest_plugins = ["tests.nova.nova_support"]
MiB = 1 << 20
DAY = 86400.0


def _entries(hook: DriverHook) -> dict[str, CacheEntry]:
    """The cache's index as any other process on the VG reads it."""
    index = Index(Path(hook.vg_spec.removeprefix("file:")) / ".pvmcache" / "index.sqlite")
    try:
        return {e.image_id: e for e in index.entries()}
    finally:
        index.close()


@pytest.fixture
def ctx(nova_db: Any) -> Iterator[Any]:
    yield nova_db
    destroy_all(nova_db)


def test_the_manager_is_a_real_nova_image_cache_manager(hook: DriverHook) -> None:
    assert issubclass(ImageManager, imagecache.ImageCacheManager)
    assert type(hook.manager) is ImageManager  # the hook's manager is ours, not nova's own
    for name in (
        "_get_base",
        "_scan_base_images",
        "_age_and_verify_cached_images",
        "update",
        "get_disk_usage",
    ):
        assert getattr(ImageManager, name) is not getattr(imagecache.ImageCacheManager, name)
    assert hook.manager.remove_unused_base_images is True  # nova's [image_cache] default
    assert hook.manager._get_base() == CONF.pvmcache.volume_group


def test_a_pass_removes_exactly_the_unused_old_enough_cache_created_images(
    hook: DriverHook,
    ctx: Any,
    glance_server: GlanceServer,
    nova_conf: Path,
) -> None:
    names = ["active", "soft_deleted", "deleted", "young", "unused"]
    imgs = {
        n: glance_server.create_image(disk_image(MiB, seed=40 + i)) for i, n in enumerate(names)
    }
    for img in imgs.values():
        assert hook.cache_image(ctx, img) is True
    for n in ("active", "soft_deleted", "deleted", "unused"):
        age(nova_conf, imgs[n], 2 * DAY)  # older than nova's default minimum age of one day
    make_instance(ctx, imgs["active"])
    make_instance(ctx, imgs["soft_deleted"], vm_state=vm_states.SOFT_DELETED)
    make_instance(ctx, imgs["deleted"]).destroy()
    (nova_conf / "i_not_ours").write_bytes(b"x" * 4096)  # an i_ disk the cache did not create
    before = _entries(hook)

    hook.manage_image_cache(ctx, host_instances(ctx))

    disk = {n: before[imgs[n]].cache_disk for n in names}
    assert sorted(hook.manager.result.removed) == sorted([disk["deleted"], disk["unused"]])
    assert sorted(hook.manager.result.kept) == sorted(
        [disk["active"], disk["soft_deleted"], disk["young"]]
    )
    assert set(_entries(hook)) == {imgs["active"], imgs["soft_deleted"], imgs["young"]}
    assert vg_files(nova_conf) == sorted(
        [disk["active"], disk["soft_deleted"], disk["young"], "i_not_ours"]
    )
    after = _entries(hook)
    for n in ("active", "soft_deleted"):  # in use: used now, so their age starts again
        assert after[imgs[n]].last_used > before[imgs[n]].last_used + DAY


def test_remove_unused_base_images_false_removes_nothing(
    nova_conf: Path, ctx: Any, glance_server: GlanceServer
) -> None:
    CONF.set_override("remove_unused_base_images", False, "image_cache")
    CONF.set_override("max_count", 0, "pvmcache")  # a budget would remove all: it must not
    hook = DriverHook(CONF)
    try:
        img = glance_server.create_image(disk_image(MiB, seed=50))
        assert hook.cache_image(ctx, img) is True
        age(nova_conf, img, 30 * DAY)
        hook.manage_image_cache(ctx, host_instances(ctx))
        assert hook.manager.result.removed == []
        assert set(_entries(hook)) == {img}
    finally:
        hook.close()


def test_the_budget_evicts_least_recently_used_first_and_never_an_image_in_use(
    hook: DriverHook, ctx: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    imgs = [glance_server.create_image(disk_image(MiB, seed=60 + i)) for i in range(4)]
    for i, img in enumerate(imgs):  # imgs[0] least recently used ... imgs[3] most
        assert hook.cache_image(ctx, img) is True
        age(nova_conf, img, 100.0 - i)  # all younger than the minimum age: only the budget acts
    make_instance(ctx, imgs[0])  # the oldest is in use
    disks = {e.image_id: e.cache_disk for e in _entries(hook).values()}
    CONF.set_override("max_bytes", 2 * MiB, "pvmcache")

    hook.manage_image_cache(ctx, host_instances(ctx))

    assert hook.manager.result.removed == [disks[imgs[1]], disks[imgs[2]]]  # LRU order
    assert set(_entries(hook)) == {imgs[0], imgs[3]}

    CONF.set_override("max_count", 0, "pvmcache")  # over budget with only the image in use
    hook.manage_image_cache(ctx, host_instances(ctx))
    assert hook.manager.result.removed == [disks[imgs[3]]]
    assert set(_entries(hook)) == {imgs[0]}  # never evicted, though the cache stays over


def test_get_disk_usage_is_the_bytes_of_the_cache_disks(
    hook: DriverHook, ctx: Any, glance_server: GlanceServer
) -> None:
    assert hook.manager.get_disk_usage() == 0
    for i in range(2):
        hook.cache_image(ctx, glance_server.create_image(disk_image((1 + i) * MiB, seed=70 + i)))
    assert hook.manager.get_disk_usage() == 3 * MiB


def test_a_pass_racing_a_deploy_storm_removes_nothing_in_use_and_fails_no_deploy(
    hook: DriverHook, ctx: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    # as aggressive as it gets: no minimum age, a budget of zero images
    CONF.set_override("remove_unused_original_minimum_age_seconds", 0, "image_cache")
    CONF.set_override("max_count", 0, "pvmcache")
    data = {n: disk_image((2 + i) * MiB, seed=80 + i) for i, n in enumerate("XYZUV")}
    img = {n: glance_server.create_image(blob) for n, blob in data.items()}
    for n in "UV":  # cached, unused, old: what the passes should remove
        hook.cache_image(ctx, img[n])
        age(nova_conf, img[n], 2 * DAY)
    unused_disks = {e.cache_disk for e in _entries(hook).values()}
    plan = [(n, make_instance(ctx, img[n])) for n in "XY" for _ in range(10)]
    snapshot = host_instances(ctx)  # X and Y are in use; Z's instances come after it
    plan += [(n, make_instance(ctx, img[n])) for n in "Z" for _ in range(10)]

    storm_done = threading.Event()
    passes: list[list[str]] = []

    def passes_until_the_storm_ends() -> None:
        while not storm_done.is_set() or not passes:
            hook.manage_image_cache(ctx, snapshot)
            passes.append(hook.manager.result.removed)

    def deploy(item: tuple[str, Any]) -> tuple[str, str]:
        name, inst = item
        meta = objects.ImageMeta.from_dict({"id": img[name], "disk_format": "raw"})
        result = hook.create_disk_from_image(ctx, inst, meta)
        assert result is not None
        return name, result.disk

    with ThreadPoolExecutor(13) as pool:
        manager = pool.submit(passes_until_the_storm_ends)
        try:
            deployed = list(pool.map(deploy, plan))  # raises if any deploy failed
        finally:
            storm_done.set()
        manager.result()

    assert len(deployed) == 30
    for name, disk in deployed:
        assert (nova_conf / disk).read_bytes() == data[name]
    removed = {d for p in passes for d in p}
    assert unused_disks <= removed
    in_use = {e.cache_disk for e in _entries(hook).values() if e.image_id in (img["X"], img["Y"])}
    assert len(in_use) == 2 and not in_use & removed
    assert glance_server.file_requests(img["X"]) == glance_server.file_requests(img["Y"]) == 1


def test_a_pass_skips_an_image_another_process_holds_and_removes_it_next_pass(
    hook: DriverHook, ctx: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    imgs = [glance_server.create_image(disk_image(MiB, seed=90 + i)) for i in range(2)]
    for img in imgs:
        hook.cache_image(ctx, img)
        age(nova_conf, img, 2 * DAY)
    # what a deploy cloning imgs[0] in another nova or pvmcache-async process holds
    other = FileLock(nova_conf / ".pvmcache" / "locks" / f"{imgs[0]}.lock", shared=True)
    assert other.try_acquire()
    try:
        hook.manage_image_cache(ctx, host_instances(ctx))  # returns: busy images are skipped
        assert set(_entries(hook)) == {imgs[0]}
    finally:
        other.release()
    hook.manage_image_cache(ctx, host_instances(ctx))
    assert _entries(hook) == {}


async def test_a_pass_clears_what_a_crashed_download_left(tmp_path: Path) -> None:
    img = str(uuid.uuid4())
    vg = FileVG(tmp_path / "vg")
    index = Index(vg.state_dir / "index.sqlite")  # as a process that died mid-download left it
    entry = CacheEntry(img, next(cache_disk_names(img)), MiB, "sha512", "0" * 128, 1.0, 1.0,
                       EntryState.FILLING)  # fmt: skip
    assert index.insert(entry)
    index.close()
    (tmp_path / "vg" / partial_disk_name()).write_bytes(b"\0" * 4096)  # its owner is dead
    cache = ImageCache(vg)
    try:
        result = await cache.prune(min_age=0)
        assert (result.removed, result.kept) == ([], [])
        assert vg_files(tmp_path / "vg") == []
        assert await cache.entries() == []
    finally:
        await cache.close()
