"""FakeImageCacheDriver as nova-compute loads it, and its disk without the cache."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nova import objects
from nova.virt import driver as virt_driver
from nova.virt import fake

from pvmcache_async.errors import DiskExists, IntegrityError
from pvmcache_async.names import instance_disk_name, partial_disk_name
from pvmcache_async.nova.fake_driver import FakeImageCacheDriver
from pvmcache_dev.glance import GlanceServer

from ..support import disk_image, vg_files
from .nova_support import CONF, make_instance

pytest_plugins = ["tests.nova.nova_support"]
MiB = 1 << 20
DRIVER = "pvmcache_ext.fake.FakeImageCacheDriver"


@pytest.fixture
def loaded(nova_conf: Path) -> Iterator[Any]:
    """The driver as nova-compute loads it: ``nova.virt.driver.load_compute_driver``."""
    CONF.set_override("compute_driver", DRIVER)
    try:
        driver = virt_driver.load_compute_driver(fake.FakeVirtAPI())
    finally:
        CONF.clear_override("compute_driver")
    yield driver
    driver.cleanup_host(CONF.host)


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pvmcache-loop"]


def _meta(image_id: str) -> Any:
    return objects.ImageMeta.from_dict({"id": image_id, "disk_format": "raw"})


def test_nova_loads_the_driver_by_name_with_has_imagecache_merged_in(loaded: Any) -> None:
    assert type(loaded) is FakeImageCacheDriver
    assert loaded.capabilities == {**fake.FakeDriver.capabilities, "has_imagecache": True}


def test_with_the_cache_off_the_driver_says_so_to_nova(nova_conf: Path) -> None:
    CONF.set_override("enabled", False, "pvmcache")
    CONF.set_override("compute_driver", DRIVER)
    try:
        driver = virt_driver.load_compute_driver(fake.FakeVirtAPI())
    finally:
        CONF.clear_override("compute_driver")
    try:
        assert driver.capabilities["has_imagecache"] is False
        assert fake.FakeDriver.capabilities["has_imagecache"] is True  # the class is untouched
        with pytest.raises(NotImplementedError):  # nova's "unsupported"
            driver.cache_image(None, str(uuid.uuid4()))
    finally:
        driver.cleanup_host(CONF.host)


def test_cleanup_host_stops_the_cache_s_loop_thread(
    loaded: Any, nova_db: Any, glance_server: GlanceServer
) -> None:
    image_id = glance_server.create_image(disk_image(MiB, seed=400))
    assert loaded.cache_image(nova_db, image_id) is True
    assert len(_loop_threads()) == 1

    loaded.cleanup_host(CONF.host)

    assert _loop_threads() == []


@pytest.fixture
def uncached(nova_conf: Path) -> Iterator[Any]:
    CONF.set_override("enabled", False, "pvmcache")
    h = FakeImageCacheDriver(fake.FakeVirtAPI()).image_cache
    yield h
    h.close()


def test_without_the_cache_each_disk_is_streamed_from_glance_by_itself(
    uncached: Any, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    data = disk_image(MiB, seed=410)
    image_id = glance_server.create_image(data)
    instances = [make_instance(nova_db, image_id) for _ in range(3)]

    disks = [uncached.stream_disk_from_glance(nova_db, i, _meta(image_id)) for i in instances]

    assert disks == [instance_disk_name(i.uuid) for i in instances]
    for disk in disks:
        assert (nova_conf / disk).read_bytes() == data
    assert glance_server.file_requests(image_id) == 3
    uncached.delete_instance_disk(instances[0])
    assert vg_files(nova_conf) == sorted(disks[1:])


def test_without_the_cache_a_corrupt_download_leaves_nothing(
    uncached: Any, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    image_id = glance_server.create_image(disk_image(MiB, seed=420))
    stored = glance_server.workdir / "images" / image_id
    blob = stored.read_bytes()
    stored.write_bytes(bytes([blob[0] ^ 0xFF]) + blob[1:])  # Glance's record is unchanged
    instance = make_instance(nova_db, image_id)

    with pytest.raises(IntegrityError, match="checksum did not match"):
        uncached.stream_disk_from_glance(nova_db, instance, _meta(image_id))

    assert vg_files(nova_conf) == []


def test_without_the_cache_a_disk_is_never_replaced_and_a_dead_partial_is_cleared(
    uncached: Any, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    data = disk_image(MiB, seed=430)
    image_id = glance_server.create_image(data)
    instance = make_instance(nova_db, image_id)
    nova_conf.mkdir(parents=True)
    # a partial whose writer died: no owner lock is held on it
    (nova_conf / partial_disk_name()).write_bytes(b"left by a crash")

    disk = uncached.stream_disk_from_glance(nova_db, instance, _meta(image_id))
    with pytest.raises(DiskExists):
        uncached.stream_disk_from_glance(nova_db, instance, _meta(image_id))

    assert vg_files(nova_conf) == [disk]
    assert (nova_conf / disk).read_bytes() == data
