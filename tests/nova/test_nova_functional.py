"""nova's own code drives the cache: its REST API, conductor, scheduler, compute manager and
periodic task, in nova's functional harness (``integrated_helpers._IntegratedTestBase``).

The compute service loads ``[DEFAULT] compute_driver = pvmcache_ext.fake.FakeImageCacheDriver``
through ``nova.virt.driver.load_compute_driver``, as nova-compute does. nova's
``GlanceFixture`` answers nova's image API with the same records as a real Glance on
loopback, which serves the image data; Glance's access log counts the downloads.

Builds run inside their API calls (``CAST_AS_CALL``): nova's database fixtures deadlock when
builds run on real threads at once. Concurrent spawns of one image are covered through the
driver facade in test_driver_hook.py.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any, ClassVar

import nova.conf
import pytest
from nova import context as nova_context
from nova.tests.functional import integrated_helpers

from pvmcache_async.names import instance_disk_name
from pvmcache_async.nova import conf as pvm_conf
from pvmcache_async.nova.fake_driver import FakeImageCacheDriver
from pvmcache_dev.glance import GlanceServer

from ..support import disk_image, holds, vg_files
from .nova_support import age

CONF = nova.conf.CONF
MiB, GiB = 1 << 20, 1 << 30
DAY = 86400.0
DRIVER = "pvmcache_ext.fake.FakeImageCacheDriver"


@pytest.fixture(autouse=True)
def _real_glance(
    request: pytest.FixtureRequest, glance_server: GlanceServer, tmp_path: Path
) -> None:
    """Hands the session's real Glance and a temp dir to nova's unittest-style test case."""
    request.instance._real_glance = glance_server
    request.instance._tmp = tmp_path


class _NovaWithCache(integrated_helpers._IntegratedTestBase):  # type: ignore[misc]
    """A nova cloud in one process whose compute runs FakeImageCacheDriver on a file VG."""

    microversion = "2.81"  # the aggregate image pre-cache API
    ADMIN_API = True
    CACHE_ENABLED: ClassVar[bool] = True

    _real_glance: GlanceServer
    _tmp: Path

    def _setup_services(self) -> None:
        pvm_conf.register_opts(CONF)
        paste = Path(sys.prefix) / "etc" / "nova" / "api-paste.ini"  # where nova's wheel puts it
        self.flags(api_paste_config=str(paste), group="wsgi")
        self.flags(instances=-1, cores=-1, ram=-1, group="quota")
        self.flags(compute_driver=DRIVER, instances_path=str(self._tmp / "instances"))
        self._vg = self._tmp / "vg"
        self.flags(
            enabled=self.CACHE_ENABLED,
            volume_group=self._vg_spec(),
            glance_url=self._real_glance.url,  # GlanceFixture's [glance] api_servers is a dummy
            group=pvm_conf.GROUP,
        )
        super()._setup_services()

    def _vg_spec(self) -> str:
        return f"file:{self._vg}"

    def _clear_attrs(self) -> None:
        # nova deletes the test's attributes after it; pytest deletes the test method it set
        # as one itself, so that one stays
        method = self.__dict__.get(self._testMethodName)
        super()._clear_attrs()
        if method is not None:
            setattr(self, self._testMethodName, method)

    # -- helpers ------------------------------------------------------------------------

    def _image(self, data: bytes) -> str:
        """An image in the real Glance, and the same record in nova's GlanceFixture."""
        image_id = self._real_glance.create_image(data)
        when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        record = {
            "id": image_id,
            "name": f"pvmcache-{image_id[:8]}",
            "status": "active",
            "disk_format": "raw",
            "container_format": "bare",
            "size": len(data),
            "min_ram": 0,
            "min_disk": 0,
            "visibility": "public",
            "protected": False,
            "created_at": when,
            "updated_at": when,
            "deleted_at": None,
            "deleted": False,
            "properties": {},
        }
        self.glance.create(None, record)
        return image_id

    def _flavor(self, disk: int) -> str:
        """A flavor of ``disk`` GB of root disk (nova's ``disk``, its ``root_gb``)."""
        body = {"name": f"disk{disk}", "ram": 512, "vcpus": 1, "disk": disk}
        return str(self.admin_api.post_flavor({"flavor": body})["id"])

    def _boot(
        self,
        image_id: str,
        expected_state: str = "ACTIVE",
        host: str | None = None,
        flavor: str | None = None,
    ) -> dict[str, Any]:
        """A server booted through nova's API, once it reached ``expected_state``; of
        ``flavor`` (default: the harness's first, m1.tiny, whose root disk is 1 GB)."""
        body = self._build_server(image_uuid=image_id, networks="none", host=host, flavor_id=flavor)
        server = self.api.post_server({"server": body})
        # the compute builds on a thread of its own even with CAST_AS_CALL; on a loaded
        # machine that takes longer than the helpers' default 5 s
        found: dict[str, Any] = self._wait_for_state_change(server, expected_state, max_retries=120)
        return found

    def _disk(self, server: dict[str, Any]) -> Path:
        return self._vg / instance_disk_name(server["id"])

    def _holds(self, server: dict[str, Any], data: bytes, size: int = GiB) -> bool:
        """Whether the server's disk is its image then zeros, ``size`` bytes in all."""
        return holds(self._disk(server), data, size)

    def _instance_disks(self) -> list[str]:
        return [d for d in vg_files(self._vg) if d.startswith("b_")] if self._vg.exists() else []

    def _cache_disks(self) -> list[str]:
        return [d for d in vg_files(self._vg) if d.startswith("i_")] if self._vg.exists() else []


class TestServersWithTheCache(_NovaWithCache):
    def test_servers_booted_through_the_api_get_their_images_disks_with_one_get_per_image(
        self,
    ) -> None:
        driver = self.compute.manager.driver
        assert type(driver) is FakeImageCacheDriver  # loaded by name through nova.virt
        assert "nova.virt.pvmcache_ext.fake" in sys.modules
        assert driver.capabilities["has_imagecache"] is True
        assert driver.capabilities["supports_evacuate"] is True  # FakeDriver's, kept

        data = [disk_image(MiB, seed=300 + i) for i in range(2)]
        images = [self._image(blob) for blob in data]
        servers = [(i, self._boot(images[i])) for i in (0, 1, 0, 1)]

        for i, server in servers:
            assert server["status"] == "ACTIVE"
            assert self._holds(server, data[i])
        for image_id in images:
            assert self._real_glance.file_requests(image_id) == 1
        assert len(self._cache_disks()) == 2

        deleted, kept = servers[0][1], servers[2][1]
        self._delete_server(deleted)
        assert not self._disk(deleted).exists()  # the instance's disk goes with it,
        assert self._holds(kept, data[0])  # its image stays cached
        assert len(self._cache_disks()) == 2

    def test_a_server_s_root_disk_is_its_flavor_s_and_the_cache_disk_its_image_s(self) -> None:
        data = disk_image(16 * MiB, seed=310)
        image_id = self._image(data)
        disk1, disk0 = self._flavor(1), self._flavor(0)

        sized = self._boot(image_id, flavor=disk1)
        as_image = self._boot(image_id, flavor=disk0)  # root_gb 0: the image's size

        assert self._holds(sized, data, GiB)
        assert self._holds(as_image, data, len(data))
        (cache_disk,) = self._cache_disks()
        assert (self._vg / cache_disk).stat().st_size == len(data)
        assert self._real_glance.file_requests(image_id) == 1

    def test_a_failed_build_leaves_no_disk_and_its_fault_names_the_image_and_the_cause(
        self,
    ) -> None:
        missing, corrupt = (self._image(disk_image(MiB, seed=320 + i)) for i in range(2))
        self._real_glance.delete(missing)  # nova's image API still lists it
        stored = self._real_glance.workdir / "images" / corrupt
        blob = stored.read_bytes()
        stored.write_bytes(bytes([blob[0] ^ 0xFF]) + blob[1:])  # Glance's record is unchanged

        # aborted, not rescheduled: no other host would find the image either (a reschedule
        # would end in "Exhausted all hosts", which names neither)
        server = self._boot(missing, expected_state="ERROR")
        message = server["fault"]["message"]
        assert "aborted" in message and missing in message and "not found in Glance" in message

        # this one nova may reschedule; with no host left, the compute's fault stays
        self.flags(max_attempts=1, group="scheduler")
        server = self._boot(corrupt, expected_state="ERROR")
        message = server["fault"]["message"]
        assert corrupt in message and "sha512 checksum did not match" in message

        assert self._instance_disks() == [] and self._cache_disks() == []


class TestImagePreCacheAPI(_NovaWithCache):
    def _summaries(self) -> list[str]:
        lines = self.stdlog.logger.output.splitlines()
        return [line.split("; ", 1)[1] for line in lines if "Image pre-cache operation" in line]

    def test_the_aggregate_image_cache_api_caches_once_then_finds_it_existing(self) -> None:
        data = disk_image(MiB, seed=340)
        image_id = self._image(data)
        self.flags(enabled=False, group=pvm_conf.GROUP)  # a second host without the cache
        self._start_compute("nocache")
        aggregate = self.admin_api.post_aggregate({"aggregate": {"name": "pvmcache"}})
        for host in ("compute", "nocache"):
            self.admin_api.add_host_to_aggregate(aggregate["id"], host)

        for n in (1, 2):
            self.admin_api.api_post(
                f"/os-aggregates/{aggregate['id']}/images", {"cache": [{"id": image_id}]}
            )
            self.notifier.wait_for_versioned_notifications("aggregate.cache_images.end", n_events=n)

        first, second = self._summaries()
        assert first.startswith("1 cached, 0 existing, 0 errors, 1 unsupported, 0 skipped")
        assert second.startswith("0 cached, 1 existing, 0 errors, 1 unsupported, 0 skipped")
        assert self._real_glance.file_requests(image_id) == 1
        assert self._cache_disks() == ["i_" + image_id[:13].replace("-", "_")]

        server = self._boot(image_id, host="compute")  # the pre-cached image serves it
        assert self._holds(server, data)
        assert self._real_glance.file_requests(image_id) == 1


class TestImageCacheManagerPass(_NovaWithCache):
    def test_nova_s_periodic_pass_removes_unused_old_images_and_keeps_the_rest(self) -> None:
        data = {name: disk_image(MiB, seed=350 + n) for n, name in enumerate("abc")}
        images = {name: self._image(blob) for name, blob in data.items()}
        servers = {name: self._boot(image_id) for name, image_id in images.items()}
        for name in "bc":
            self._delete_server(servers[name])
        for name in "ab":  # a: in use; b: unused; c: unused but younger than the minimum age
            age(self._vg, images[name], 2 * DAY)
        cache_disk = {name: "i_" + images[name][:13].replace("-", "_") for name in images}

        self.compute.manager._run_image_cache_manager_pass(nova_context.get_admin_context())

        assert self._cache_disks() == sorted([cache_disk["a"], cache_disk["c"]])
        assert self._holds(servers["a"], data["a"])
        assert "Removed unused cache disks: " + cache_disk["b"] in self.stdlog.logger.output

        again = self._boot(images["b"])  # a removed image is fetched afresh when needed
        assert self._holds(again, data["b"])
        assert self._real_glance.file_requests(images["b"]) == 2


class TestServersWithoutTheCache(_NovaWithCache):
    CACHE_ENABLED = False

    def test_each_server_streams_its_image_from_glance_into_its_own_disk(self) -> None:
        driver = self.compute.manager.driver
        assert driver.capabilities["has_imagecache"] is False
        data = disk_image(MiB, seed=360)
        image_id = self._image(data)

        servers = [self._boot(image_id) for _ in range(2)]

        for server in servers:
            assert self._holds(server, data)  # m1.tiny's 1 GB, as with the cache
        assert self._real_glance.file_requests(image_id) == 2  # one GET per server
        assert self._cache_disks() == []
        self._delete_server(servers[0])
        assert not self._disk(servers[0]).exists() and self._disk(servers[1]).exists()

    def test_an_image_glance_does_not_have_fails_the_build_with_its_cause_and_no_disk(
        self,
    ) -> None:
        image_id = self._image(disk_image(MiB, seed=370))
        self._real_glance.delete(image_id)

        server = self._boot(image_id, expected_state="ERROR")

        message = server["fault"]["message"]
        assert "aborted" in message and image_id in message and "not found in Glance" in message
        assert self._instance_disks() == []


class TestServersOnPowerVM(_NovaWithCache):
    """The same nova, its compute's VG a PowerVM VG: pypowervm's AdapterFx with the fake VIOS
    of integration/test_powervm.py behind it (the local NovaLink spelling: no host, no password)."""

    def _vg_spec(self) -> str:
        pytest.importorskip("pypowervm")
        import fixtures
        from pypowervm.tests import test_fixtures as pvm_fx

        from ..integration.test_powervm import VG_NAME, FakePowerVM

        self.useFixture(fixtures.EnvironmentVariable("XDG_STATE_HOME", str(self._tmp / "xdg")))
        adapter = self.useFixture(pvm_fx.AdapterFx(traits=pvm_fx.LocalPVMTraits))
        self.pvm = FakePowerVM(adapter.adpt)
        return f"powervm:vg={VG_NAME},state_dir={self._tmp / 'state'}"

    def test_a_server_s_root_disk_is_a_copy_of_its_flavor_s_size(self) -> None:
        data = disk_image(4 * MiB, seed=380)
        image_id = self._image(data)
        disk2, disk0 = self._flavor(2), self._flavor(0)

        sized = self._boot(image_id, flavor=disk2)
        as_image = self._boot(image_id, flavor=disk0)

        b_sized, b_image = (instance_disk_name(s["id"]) for s in (sized, as_image))
        assert self.pvm.disk(b_sized).capacity == 2  # crt_copy_vdisk's d_size: the flavor's GB
        assert self.pvm.disk(b_image).capacity == 1  # the image's 4 MiB, in whole GB
        assert self.pvm.content(b_sized) == self.pvm.content(b_image) == data
        (cache_disk,) = [n for n in self.pvm.names() if n.startswith("i_")]
        assert self.pvm.disk(cache_disk).capacity == 1
        assert self._real_glance.file_requests(image_id) == 1
        self._delete_server(sized)
        assert b_sized not in self.pvm.names() and b_image in self.pvm.names()
