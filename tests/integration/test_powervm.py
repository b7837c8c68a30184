"""The PowerVM backend on pypowervm: its own AdapterFx, recorded responses and wrappers.

No PowerVM server can run here, so the REST side is pypowervm's ``AdapterFx`` (a patched
``pypowervm.adapter.Adapter``) answering like a VIOS would: ``FakePowerVM`` starts from the
recorded ``fake_vios_feed.txt`` and ``upload_volgrp.txt``, and applies each VG update that
pypowervm's own ``tasks.storage`` sends (new disks, copies, renames, removals, etags), keeps
each disk's bytes and reads uploads from the stream pypowervm passes on. Everything above it
is real: pypowervm's tasks and wrappers, the backend, ``ImageCache`` and a real Glance.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pypowervm")

from pypowervm import adapter as pvm_adpt
from pypowervm import entities as pvm_ent
from pypowervm import exceptions as pvm_exc
from pypowervm.helpers import log_helper, vios_busy
from pypowervm.tasks import storage as pvm_stg
from pypowervm.tests import test_fixtures as pvm_fx
from pypowervm.tests.tasks import util as pvm_tju
from pypowervm.tests.test_utils import pvmhttp
from pypowervm.wrappers import storage as pvm_stor
from pypowervm.wrappers import vios_file as pvm_vf
from pypowervm.wrappers import virtual_io_server as pvm_vios

from pvmcache_async import (
    CacheSettings,
    GlanceClient,
    ImageCache,
    InsufficientSpace,
    IntegrityError,
    InvalidInput,
    Outcome,
)
from pvmcache_async.core.direct import stream_disk
from pvmcache_async.errors import DiskExists, StorageError
from pvmcache_async.models import ImageInfo
from pvmcache_async.names import (
    PARTIAL_PREFIX,
    cache_disk_names,
    instance_disk_name,
    partial_disk_name,
)
from pvmcache_async.storage import DiskIdentity, open_vg
from pvmcache_async.storage.powervm.backend import PowerVMVG
from pvmcache_async.storage.powervm.partial import PowerVMPartialDisk
from pvmcache_async.storage.powervm.spec import PASSWORD_ENV, connect, parse_spec
from pvmcache_async.storage.powervm.state import STRAY_AGE, TIMED_OUT
from pvmcache_async.storage.powervm.stream import StreamBuffer
from pvmcache_dev.glance import GlanceServer

from ..support import disk_image

MiB = 1 << 20
VG_NAME = "image_pool"  # the VG of upload_volgrp.txt


class FakePowerVM:
    """The REST server behind pypowervm's AdapterFx adapter: one VIOS holding our VG, and
    another VG (``rootvg``) of that VIOS, with what a real VIOS does that the backend must
    cope with:

    * a VG update replaces the VG as sent: a PUT without If-Match (pypowervm's ``crt_vdisk``)
      built on an old read undoes what others changed since (renames, new disks);
    * stale etags for any conditional PUT (``stale_puts``), "VIOS busy" answers
      (``busy``: the recorded HttpErrorResponse), copies that take time (``copy_seconds``)
      or wait for the test (``hold_copy``), names unique per VIOS (across both VGs), a
      server that ignores renames (``ignore_renames``), File removals that fail
      (``file_delete_fails``);
    * requests pass through the helpers the Adapter was built with, as a real Adapter's do.
    """

    def __init__(self, adpt: Any) -> None:
        self.adpt = adpt
        self._lock = threading.RLock()
        self.vios_feed = pvm_tju.load_file("fake_vios_feed.txt", adpt)
        self.systems = pvm_tju.load_file("fake_managedsystem.txt", adpt)  # a NovaLink's one
        self.vg_on_every_vios = False  # our VG's name also on the VIOS's partner
        self.vios_uuid = pvm_vios.VIOS.wrap(self.vios_feed)[0].uuid
        vg_resp = pvm_tju.load_file("upload_volgrp.txt", adpt)
        self.vg_uuid = pvm_stor.VG.wrap(vg_resp).uuid
        self.vg_entry = vg_resp.entry
        self.etag = 1
        self.data: dict[str, bytes] = {d.udid: b"" for d in self._vg().virtual_disks}
        self.files: dict[str, str] = {}  # File uuid -> udid of the disk it fills
        self._file_entry = pvm_tju.load_file("upload_file.txt", adpt).entry
        self._udids = 100
        self.calls: list[tuple[str, ...]] = []
        self.stale_renames = 0  # the next N renames meet a VG another client just changed
        self.fail_upload_after: int | None = None  # the VIOS breaks off after this many bytes
        self.read_pause: threading.Event | None = None  # cleared: the upload stops reading
        self.reading = threading.Event()  # set at the upload's first read
        self.lag: list[int] = []  # download bytes not yet uploaded, seen at each read
        self.uploads_running = 0
        self.vg_reads = 0  # GETs of the VG, each a slow REST call on a real VIOS
        self.stale_puts = 0  # the next N conditional VG PUTs meet a VG changed meanwhile
        self.busy = 0  # the next N VG updates are answered "VIOS busy"
        self.busy_answers = 0
        self.copy_seconds = 0.0  # how long a server-side copy takes
        self.hold_copy: threading.Event | None = None  # set: a held copy goes on
        self.copy_held = threading.Event()  # set once a copy waits for hold_copy
        self.copies_running = self.max_copies_running = 0
        self.ignore_renames = False
        self.refuse_renames = False  # a VG update that renames a disk is answered 400
        self.copy_times_out = False  # the client's wait ends; the VIOS makes the disk anyway
        self.free_gb = 1045  # upload_volgrp.txt's; each disk made takes its whole GB
        self.file_delete_fails = 0  # the next N File removals fail
        self.files_left: set[str] = set()
        self.helpers: list[Callable[..., Any]] = []  # what Adapter(session, helpers=) got
        self.sleeps: list[float] = []  # vios_busy_retry_helper's waits
        self.helpers_of: dict[str, list[Callable[..., Any]]] = {}  # each request's, by kind
        self.adapters_built = 0
        other = pvm_tju.load_file("upload_volgrp.txt", adpt).entry
        self.other_vg = pvm_stor.VG.wrap(other)  # rootvg, of the same VIOS
        self.other_vg.set_parm_value("GroupName", "rootvg")
        self.other_vg.virtual_disks[0].name = "hd5"
        self.other_uuid = str(uuid.uuid4())
        other.properties["id"] = self.other_uuid
        adpt.read.side_effect = self._served(self.read)
        adpt.read_by_href.side_effect = self._served(lambda *a, **k: self._vg_resp())
        adpt.update_by_path.side_effect = self._served(self.update_by_path)
        adpt.create.side_effect = self._served(self.create)
        adpt.upload_file.side_effect = self._served(self.upload_file)
        adpt.delete.side_effect = self._served(self.delete)
        adpt.side_effect = self._build_adapter  # pypowervm.adapter.Adapter(session, ...)
        type(adpt).helpers = property(lambda _: list(self.helpers))  # a copy, as Adapter's

    def _build_adapter(self, session: Any, helpers: Any = None, **_: Any) -> Any:
        self.adapters_built += 1
        self.helpers = [helpers] if callable(helpers) else list(helpers or [])
        return self.adpt

    def _served(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler`` behind the Adapter's helpers (a call's own ``helpers=`` first), as
        ``Adapter._request`` stacks them around the session's request."""

        def request(*args: Any, helpers: Any = None, **kwargs: Any) -> Any:
            chain = self.helpers if helpers is None else helpers
            chain = [chain] if callable(chain) else list(chain)
            self.helpers_of[handler.__name__] = chain
            func = handler
            for helper in reversed(chain):
                func = helper(func)
            return func(*args, **kwargs)

        return request

    # -- what a test looks at --

    def _vg(self) -> Any:
        return pvm_stor.VG.wrap(self.vg_entry)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(d.name for d in self._vg().virtual_disks)

    def content(self, name: str) -> bytes:
        with self._lock:
            (disk,) = [d for d in self._vg().virtual_disks if d.name == name]
            return self.data[disk.udid]

    def disk(self, name: str) -> Any:
        with self._lock:
            (disk,) = [d for d in self._vg().virtual_disks if d.name == name]
            return disk

    def ops(self) -> list[tuple[str, ...]]:
        """The calls that change disks (File bookkeeping left out)."""
        return [c for c in self.calls if c[0] != "file_deleted"]

    # -- the REST API --

    def _resp(self, entry: Any = None, feed: list[Any] | None = None) -> Any:
        resp = pvm_adpt.Response("GET", "/rest/api/uom/x", 200, "OK", {"etag": str(self.etag)})
        if feed is not None:
            resp.feed = pvm_ent.Feed({}, feed)
        else:
            resp.entry = entry
        return resp

    def _vg_copy(self) -> Any:
        entry = copy.deepcopy(self.vg_entry)
        entry.properties["etag"] = str(self.etag)
        return entry

    def _busy_error(self) -> pvm_exc.HttpError:
        self.busy_answers += 1
        return pvm_exc.HttpError(pvmhttp.load_pvm_resp("fake_httperror.txt").response)

    def _vg_resp(self) -> Any:
        with self._lock:
            return self._resp(self._vg_copy())

    @staticmethod
    def _error(status: int, path: str = "/rest/api/uom/x") -> pvm_exc.HttpError:
        return pvm_exc.HttpError(pvm_adpt.Response("POST", path, status, "fake VIOS", {}))

    def read(
        self,
        root_type: str,
        root_id: str | None = None,
        child_type: str | None = None,
        child_id: str | None = None,
        suffix_type: str | None = None,
        suffix_parm: str | None = None,
        **_: Any,
    ) -> Any:
        with self._lock:
            if root_type == "ManagedSystem" and root_id is None:
                return self.systems
            if root_type == "ManagedSystem" and child_type == "VirtualIOServer":
                return self.vios_feed  # the same VIOSes under every system
            if root_type == "VirtualIOServer" and child_type is None and root_id is None:
                if suffix_type == "search" and suffix_parm:
                    m = re.fullmatch(r"\((\w+)=='(.+)'\)", suffix_parm)
                    assert m and m.group(1) == "PartitionName", suffix_parm
                    wanted = urllib.parse.unquote(m.group(2))
                    wrapped = [pvm_vios.VIOS.wrap(e) for e in self.vios_feed.feed.entries]
                    hits = [w.entry for w in wrapped if w.name == wanted]
                    return self._resp(feed=hits)
                return self.vios_feed
            if root_type == "VirtualIOServer" and child_type == "VolumeGroup":
                if root_id != self.vios_uuid:
                    if child_id is None:
                        return self._resp(feed=[self._vg_copy()] if self.vg_on_every_vios else [])
                    raise self._error(404)
                if child_id is None:
                    return self._resp(feed=[self._vg_copy(), copy.deepcopy(self.other_vg.entry)])
                if child_id == self.vg_uuid:
                    self.vg_reads += 1
                    return self._resp(self._vg_copy())
                raise self._error(404)
        raise AssertionError(f"unexpected read {root_type} {root_id} {child_type} {child_id}")

    def _copying(self, data: Any) -> bool:
        return any(d._get_val_str("BaseImage") for d in pvm_stor.VG.wrap(data.entry).virtual_disks)

    def update_by_path(self, data: Any, etag: Any, path: str, **_: Any) -> Any:
        with self._lock:
            if self.busy:
                self.busy -= 1
                raise self._busy_error()
        copying = self._copying(data)
        if copying:  # the VIOS answers once the copy is made; the VG's lock is not held
            with self._lock:
                self.copies_running += 1
                self.max_copies_running = max(self.max_copies_running, self.copies_running)
            try:
                if self.hold_copy is not None:
                    self.copy_held.set()
                    self.hold_copy.wait(30)
                time.sleep(self.copy_seconds)
            finally:
                with self._lock:
                    self.copies_running -= 1
        with self._lock:
            new = pvm_stor.VG.wrap(copy.deepcopy(data.entry))
            old = {d.udid: d for d in self._vg().virtual_disks}
            if self.refuse_renames and any(
                d.udid in old and old[d.udid].name != d.name for d in new.virtual_disks
            ):
                raise self._error(400, path)
            if self.ignore_renames:
                for d in new.virtual_disks:
                    if d.udid in old:
                        d.name = old[d.udid].name
            renames = [
                ("rename", old[d.udid].name, d.name)
                for d in new.virtual_disks
                if d.udid in old and old[d.udid].name != d.name
            ]
            if etag is not None and renames and self.stale_renames:
                self.stale_renames -= 1
                self.etag += 1  # another client changed the VG since pypowervm read it
                self.calls.append(("etag_mismatch",))
            elif etag is not None and self.stale_puts:
                self.stale_puts -= 1
                self.etag += 1
                self.calls.append(("etag_mismatch",))
            if etag is not None and str(etag) != str(self.etag):  # no etag: no If-Match
                raise self._error(412, path)
            names = [d.name for d in new.virtual_disks]
            elsewhere = {d.name for d in self.other_vg.virtual_disks}
            if len(names) != len(set(names)) or elsewhere & set(names):
                raise self._error(400, path)  # an AIX LV name is unique on its VIOS
            done: list[tuple[str, ...]] = []
            for d in new.virtual_disks:
                if d.udid is not None:
                    continue
                udid = f"0300f8d6de00004b000000014a54555cd9.{self._udids}"
                self._udids += 1
                base = d._get_val_str("BaseImage")
                if base:
                    if base not in self.data:
                        raise self._error(400, path)
                    self.data[udid] = self.data[base]
                    src = old[base].name
                    d.element.remove(d.element.find("BaseImage"))
                    done.append(("copy", src, d.name))
                else:
                    self.data[udid] = b""
                    done.append(("create", d.name))
                d.set_parm_value("UniqueDeviceID", udid)
            kept = {d.udid for d in new.virtual_disks}
            for udid, d in old.items():
                if udid not in kept:
                    self.data.pop(udid, None)
                    done.append(("delete", d.name))
            made = sum(math.ceil(d.capacity) for d in new.virtual_disks if d.udid not in old)
            gone = sum(math.ceil(d.capacity) for u, d in old.items() if u not in kept)
            if made - gone > self.free_gb:
                raise self._error(500, path)  # the VIOS's own words for a full VG are unknown
            self.set_free(self.free_gb - made + gone, new)
            self.calls.extend(renames + done)
            self.etag += 1
            self.vg_entry = new.entry
            if copying and self.copy_times_out:
                raise pvm_exc.TimeoutError("the copy's PUT timed out on the client")
            return self._resp(self._vg_copy())

    def set_free(self, gb: int, vg: Any = None) -> None:
        """The VG's free GB, as its AvailableSize and FreeSpace say."""
        self.free_gb = gb
        vg = vg if vg is not None else self._vg()
        for tag in ("AvailableSize", "FreeSpace"):
            vg.set_parm_value(tag, str(gb))

    def create(self, wrapper: Any, root_type: str, **_: Any) -> Any:
        assert root_type == "File"
        with self._lock:
            entry = copy.deepcopy(self._file_entry)
            f = pvm_vf.File.wrap(entry)
            file_uuid = str(uuid.uuid4())
            f.set_parm_value("FileUUID", file_uuid)
            f._tdev_udid(wrapper.tdev_udid)
            f._file_name(wrapper.file_name)
            self.files[file_uuid] = wrapper.tdev_udid
            return self._resp(entry)

    def upload_file(self, filedescr: Any, filehandle: Any, chunksize: int = 65536, **_: Any) -> Any:
        udid = self.files[filedescr.findtext("FileUUID")]
        name = filedescr.findtext("Filename")
        got = bytearray()
        with self._lock:
            self.uploads_running += 1
        try:
            while True:
                if self.read_pause is not None:
                    self.read_pause.wait()
                piece = filehandle.read(chunksize)
                self.reading.set()
                if isinstance(filehandle, StreamBuffer):
                    self.lag.append(filehandle.bytes_written - filehandle.bytes_read)
                if not piece:
                    break
                got += piece
                if self.fail_upload_after is not None and len(got) >= self.fail_upload_after:
                    raise self._error(500)
        finally:
            with self._lock:
                self.uploads_running -= 1
        with self._lock:
            if udid in self.data:
                self.data[udid] = bytes(got)
            self.calls.append(("upload", name, str(len(got))))
        return self._resp()

    def delete(self, root_type: str, root_id: str | None = None, **_: Any) -> None:
        assert root_type == "File"
        with self._lock:
            if self.file_delete_fails:
                self.file_delete_fails -= 1
                self.files_left.add(str(root_id))
                raise self._error(500)
            self.files_left.discard(str(root_id))
        self.calls.append(("file_deleted",))


@pytest.fixture
def pvm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePowerVM]:
    fx = pvm_fx.AdapterFx(traits=pvm_fx.RemotePVMTraits)
    fx.setUp()
    fake = FakePowerVM(fx.adpt)
    monkeypatch.setattr(vios_busy, "SLEEP", fake.sleeps.append)  # its waits, recorded
    try:
        yield fake
    finally:
        if fake.read_pause is not None:  # a failed test must not leave an upload thread waiting
            fake.read_pause.set()
        if fake.hold_copy is not None:
            fake.hold_copy.set()
        fx.cleanUp()


@pytest.fixture
async def vg(pvm: FakePowerVM, tmp_path: Path) -> AsyncIterator[PowerVMVG]:
    v = PowerVMVG(lambda: pvm.adpt, VG_NAME, state_dir=tmp_path / "state", buffer_bytes=MiB)
    yield v
    await v.close()


@pytest.fixture
async def cache(vg: PowerVMVG, glance_server: GlanceServer) -> AsyncIterator[ImageCache]:
    c = ImageCache(vg, GlanceClient(glance_server.url, chunk_size=256 << 10))
    yield c
    await c.close()


class WrongDigestGlance(GlanceClient):
    """The real Glance and download, but the record's digest says something else."""

    async def get_image(self, image_id: str) -> ImageInfo:
        info = await super().get_image(image_id)
        return dataclasses.replace(info, digest="0" * len(info.digest))


def _leftovers(pvm: FakePowerVM) -> list[str]:
    return [n for n in pvm.names() if n.startswith(("i_", "p_", "b_", "t_"))]


# -- a miss, a hit, and what goes wrong -----------------------------------------------------


async def test_miss_creates_partial_streams_then_renames_after_the_digest_matched(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(3 * MiB, seed=51)
    image = glance_server.create_image(data)

    result = await cache.ensure(image)

    partial = pvm.ops()[0][1]
    assert partial.startswith(PARTIAL_PREFIX)  # a name of this writer's own
    assert result.outcome is Outcome.MISS and result.bytes_fetched == len(data)
    assert pvm.ops() == [
        ("create", partial),
        ("upload", partial, str(len(data))),
        ("rename", partial, result.cache_disk),
    ]
    assert pvm.content(result.cache_disk) == data
    assert partial not in pvm.names()
    assert await cache.vg.disk_size(result.cache_disk) == len(data)
    assert pvm.disk(result.cache_disk).label == image  # the full id, beside the index


async def test_hit_uploads_nothing_and_copies_once(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(2 * MiB, seed=52)
    image = glance_server.create_image(data)
    cache_disk = (await cache.ensure(image)).cache_disk
    pvm.calls.clear()
    instance = str(uuid.uuid4())

    deployed = await cache.deploy(image, instance)

    assert deployed.outcome is Outcome.HIT and deployed.bytes_fetched == 0
    assert pvm.ops() == [("copy", cache_disk, instance_disk_name(instance))]
    assert pvm.content(deployed.disk) == data
    assert glance_server.file_requests(image) == 1


async def test_a_deploy_of_a_size_copies_into_a_disk_of_that_many_gb(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(2 * MiB, seed=49)
    image = glance_server.create_image(data)

    deployed = await cache.deploy(image, str(uuid.uuid4()), size=3 << 30)
    plain = await cache.deploy(image, str(uuid.uuid4()))

    assert pvm.disk(deployed.disk).capacity == 3  # crt_copy_vdisk's d_size, in GB
    assert await cache.vg.disk_size(deployed.disk) == 3 << 30
    assert pvm.disk(plain.disk).capacity == 1 and pvm.disk(deployed.cache_disk).capacity == 1
    assert await cache.vg.disk_size(plain.disk) == len(data)
    assert pvm.content(deployed.disk) == data


async def test_a_disk_streamed_without_the_cache_is_grown_to_its_size_as_it_is_renamed(
    vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(MiB, seed=48)
    image = glance_server.create_image(data)
    glance = GlanceClient(glance_server.url)
    try:
        disk, _ = await stream_disk(glance, vg, image, str(uuid.uuid4()), 2 << 30)
    finally:
        await glance.close()

    assert pvm.disk(disk).capacity == 2  # grown in the update that renamed it
    assert await vg.disk_size(disk) == 2 << 30 and pvm.content(disk) == data
    assert [c[0] for c in pvm.ops()] == ["create", "upload", "rename"]


async def test_concurrent_deploys_download_once_and_copy_each(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(2 * MiB, seed=50)
    image = glance_server.create_image(data)
    instances = [str(uuid.uuid4()) for _ in range(12)]

    results = await asyncio.gather(*(cache.deploy(image, i) for i in instances))

    assert glance_server.file_requests(image) == 1
    assert sorted(r.outcome.value for r in results).count("miss") == 1
    assert [c[0] for c in pvm.ops()].count("upload") == 1
    assert [c[0] for c in pvm.ops()].count("copy") == len(instances)
    for r in results:
        assert pvm.content(r.disk) == data


async def test_a_storm_of_warm_deploys_shares_its_looks_at_the_vg(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    image = glance_server.create_image(disk_image(MiB, seed=53))
    await cache.ensure(image)
    instances = [str(uuid.uuid4()) for _ in range(20)]
    pvm.vg_reads = 0

    results = await asyncio.gather(*(cache.deploy(image, i) for i in instances))

    assert {r.outcome for r in results} == {Outcome.HIT}
    assert [c[0] for c in pvm.ops()].count("copy") == len(instances)
    # a deploy looks at the VG four times (is its disk free? the image's disk there, before
    # and under the lock; the source's udid) and pypowervm's copy reads it once more for its
    # etag: 5 GETs each if nothing were shared (42 in all here when this test was written)
    assert pvm.vg_reads < 5 * len(instances)


async def test_looks_at_the_vg_asked_at_once_share_one_read(
    vg: PowerVMVG, pvm: FakePowerVM
) -> None:
    names = [*pvm.names(), "b_not_there"]
    await vg.disk_size(names[0])  # connected: find_vg's reads are behind us
    pvm.vg_reads = 0

    listed, *sizes = await asyncio.gather(vg.list_disks(), *(vg.disk_size(n) for n in names * 10))

    assert pvm.vg_reads == 1
    by_name = {d.name: d.size for d in listed}  # type: ignore[union-attr]
    assert len(by_name) == len(names) - 1
    assert sizes == [by_name.get(n) for n in names] * 10


async def test_failed_digest_removes_the_partial_and_renames_nothing(
    vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    image = glance_server.create_image(disk_image(2 * MiB, seed=53))
    cache = ImageCache(vg, WrongDigestGlance(glance_server.url))
    try:
        with pytest.raises(IntegrityError, match="checksum did not match"):
            await cache.ensure(image)
    finally:
        await cache.close()

    partial = pvm.ops()[0][1]
    assert pvm.ops() == [("create", partial), ("delete", partial)]
    assert not any(c[0] in ("rename", "upload") for c in pvm.calls)
    assert _leftovers(pvm) == []


async def test_upload_exception_stops_the_download_and_leaves_no_disk(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    size = 40 * MiB
    image = glance_server.create_image(disk_image(size, seed=54))
    pvm.fail_upload_after = 2 * MiB

    with pytest.raises(StorageError, match="upload to PowerVM failed"):
        await cache.ensure(image)

    assert _leftovers(pvm) == []
    created = [c[1] for c in pvm.ops() if c[0] == "create"]
    assert ("delete", created[0]) in pvm.ops()
    assert not any(c[0] == "rename" for c in pvm.calls)
    assert glance_server.bytes_served(image) < size  # the download stopped early
    assert await cache.entries() == []


async def test_etag_mismatch_on_rename_is_retried(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(MiB, seed=55)
    image = glance_server.create_image(data)
    pvm.stale_renames = 2

    result = await cache.ensure(image)

    mismatches = [c for c in pvm.calls if c[0] == "etag_mismatch"]
    assert len(mismatches) == 2
    op, partial, final = pvm.ops()[-1]
    assert (op, final) == ("rename", result.cache_disk) and partial.startswith(PARTIAL_PREFIX)
    assert pvm.content(result.cache_disk) == data


async def test_uuids_sharing_their_first_12_hex_digits_get_distinct_disks(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    ids = [f"3e865d14-8c1e-4{n:03d}-8000-{uuid.uuid4().hex[:12]}" for n in (1, 2)]
    data = {i: disk_image(MiB, seed=60 + n) for n, i in enumerate(ids)}
    for i in ids:
        glance_server.create_image(data[i], image_id=i)

    ensured = [await cache.ensure(i) for i in ids]
    deployed = [await cache.deploy(i, str(uuid.uuid4())) for i in ids]

    assert ensured[0].cache_disk == "i_3e865d14_8c1e"
    assert ensured[0].cache_disk != ensured[1].cache_disk
    for d in deployed:
        assert pvm.content(d.disk) == data[d.image_id]
        assert d.outcome is Outcome.HIT


async def test_partial_left_by_a_crash_is_removed_and_never_cloned(
    cache: ImageCache, pvm: FakePowerVM, vg: PowerVMVG, glance_server: GlanceServer
) -> None:
    data = disk_image(MiB, seed=56)
    image = glance_server.create_image(data)
    t = vg.target_sync()
    partial = partial_disk_name()
    (vg.owners.directory / f"{partial}.lock").touch()  # a dead writer's: its owner file, free
    pvm_stg.crt_vdisk(pvm.adpt, t.vios_uuid, t.vg_uuid, partial, 1)
    pvm.calls.clear()

    deployed = await cache.deploy(image, str(uuid.uuid4()))

    ops = pvm.ops()
    assert ops[0] == ("delete", partial)
    assert [c[1].startswith(PARTIAL_PREFIX) for c in ops if c[0] == "create"] == [True]
    assert all(c[1] != partial for c in ops if c[0] in ("create", "copy"))
    assert pvm.content(deployed.disk) == data
    assert partial not in pvm.names()


async def test_a_partial_without_an_owner_file_is_left_until_it_is_old(
    vg: PowerVMVG, pvm: FakePowerVM, tmp_path: Path
) -> None:
    t = vg.target_sync()
    stray = partial_disk_name()  # a live writer's with another state directory, or a host's
    pvm_stg.crt_vdisk(pvm.adpt, t.vios_uuid, t.vg_uuid, stray, 1)
    other = PowerVMVG(lambda: pvm.adpt, VG_NAME, state_dir=tmp_path / "elsewhere")

    assert await vg.remove_dead_temporaries() == []
    assert await other.remove_dead_temporaries() == []
    assert stray in pvm.names()

    record = vg.state_dir / "strays" / f"{stray}.json"  # first seen a day ago, same disk
    first = json.loads(record.read_text())
    record.write_text(json.dumps({**first, "seen": first["seen"] - STRAY_AGE}))
    assert await vg.remove_dead_temporaries() == [stray]
    assert stray not in pvm.names()
    await other.close()


async def test_a_state_directory_serves_one_vg_and_a_vg_one_state_directory(
    pvm: FakePowerVM, tmp_path: Path
) -> None:
    claims = tmp_path / "claims"

    def opened(vg_name: str, state: str) -> PowerVMVG:
        return PowerVMVG(lambda: pvm.adpt, vg_name, state_dir=tmp_path / state, claims_dir=claims)

    first = opened(VG_NAME, "a")
    assert [d.name for d in await first.list_disks()] == ["test"]
    vios = pvm_vios.VIOS.wrap(pvm.vios_feed)[0].name
    again = PowerVMVG(
        lambda: pvm.adpt, VG_NAME, vios_name=vios, state_dir=tmp_path / "a", claims_dir=claims
    )
    assert [d.name for d in await again.list_disks()] == ["test"]  # another spelling: fine

    with pytest.raises(StorageError, match=f"already cached on this host .*state_dir={tmp_path}/a"):
        await opened(VG_NAME, "b").list_disks()
    with pytest.raises(StorageError, match="belongs to another volume group"):
        await opened("rootvg", "a").list_disks()  # the VIOS's other VG


async def test_a_partial_whose_writer_is_alive_is_never_removed(
    cache: ImageCache, pvm: FakePowerVM, vg: PowerVMVG, glance_server: GlanceServer
) -> None:
    image = glance_server.create_image(disk_image(MiB, seed=58))
    partial = await vg.create_partial(partial_disk_name(), MiB)  # a live writer's, not yet sent
    await partial.write(b"\0" * 4096)
    await asyncio.sleep(0.05)  # its upload thread has created the disk
    assert partial.name in pvm.names()

    await cache.deploy(image, str(uuid.uuid4()))
    await cache.sweep()

    assert partial.name in pvm.names()
    await partial.discard()
    assert partial.name not in pvm.names()
    assert await cache.sweep() == []


async def test_rewind_drops_the_sent_stream_and_starts_a_new_disk(
    vg: PowerVMVG, pvm: FakePowerVM
) -> None:
    good = disk_image(2 * MiB, seed=57)
    partial = await vg.create_partial("p_rewindtest", len(good))
    await partial.write(b"\xff" * MiB)
    await partial.rewind()
    for i in range(0, len(good), 512 << 10):
        await partial.write(good[i : i + (512 << 10)])
    await partial.publish("i_rewound")

    assert pvm.content("i_rewound") == good
    assert pvm.ops() == [
        ("create", "p_rewindtest"),
        ("delete", "p_rewindtest"),
        ("create", "p_rewindtest"),
        ("upload", "p_rewindtest", str(len(good))),
        ("rename", "p_rewindtest", "i_rewound"),
    ]


async def test_publish_never_replaces_an_existing_disk(vg: PowerVMVG, pvm: FakePowerVM) -> None:
    partial = await vg.create_partial("p_clash", 4)
    await partial.write(b"data")
    with pytest.raises(DiskExists, match="test already exists"):
        await partial.publish("test")  # the recorded disk of upload_volgrp.txt
    await partial.discard()

    assert "p_clash" not in pvm.names()
    assert pvm.names() == ["test"]


async def test_label_records_the_image_id_when_given(vg: PowerVMVG, pvm: FakePowerVM) -> None:
    image = str(uuid.uuid4())
    partial = await vg.create_partial("p_labeled", 3, identity=DiskIdentity(image, 3))
    await partial.write(b"abc")
    await partial.publish("i_labeled")

    assert pvm.disk("i_labeled").label == image
    assert await vg.disk_identity("i_labeled") == DiskIdentity(image, 3)


async def test_capacity_is_whole_free_gb_of_the_vg(vg: PowerVMVG) -> None:
    cap = await vg.capacity()
    # upload_volgrp.txt: GroupCapacity 1063, AvailableSize and FreeSpace 1045 (GB)
    assert (cap.total, cap.free) == (1063 << 30, 1045 << 30)


async def test_recorded_disks_are_listed_with_their_gb_size(vg: PowerVMVG) -> None:
    disks = await vg.list_disks()
    assert [(d.name, d.size) for d in disks] == [("test", 1 << 30)]
    assert await vg.disk_size("absent") is None


async def test_the_managed_system_and_the_vios_must_be_named_where_there_are_several(
    pvm: FakePowerVM, tmp_path: Path
) -> None:
    pvm.systems = pvm_tju.load_file("managedsystem.txt", pvm.adpt)  # an HMC managing three

    def opened(**names: str) -> PowerVMVG:
        return PowerVMVG(lambda: pvm.adpt, VG_NAME, state_dir=tmp_path / "s", **names)

    with pytest.raises(InvalidInput, match=r"manages 3 systems .*HV4.*name one .system=."):
        await opened().list_disks()
    assert [d.name for d in await opened(system_name="HV4").list_disks()] == ["test"]
    with pytest.raises(StorageError, match="no managed system HV5"):
        await opened(system_name="HV5").list_disks()

    pvm.vg_on_every_vios = True  # a VG of that name on both VIOSes of HV4
    with pytest.raises(InvalidInput, match="on VIOSes nimbus-ch03-p2-vios1, nimbus-ch03-p2-vios2"):
        await opened(system_name="HV4").list_disks()
    named = opened(system_name="HV4", vios_name="nimbus-ch03-p2-vios2")
    assert [d.name for d in await named.list_disks()] == ["test"]


async def test_vios_name_selects_the_vios(pvm: FakePowerVM, tmp_path: Path) -> None:
    name = pvm_vios.VIOS.wrap(pvm.vios_feed)[0].name
    good = PowerVMVG(lambda: pvm.adpt, VG_NAME, vios_name=name, state_dir=tmp_path / "a")
    assert [d.name for d in await good.list_disks()] == ["test"]
    wrong = PowerVMVG(lambda: pvm.adpt, "rootvg", vios_name=name, state_dir=tmp_path / "b")
    with pytest.raises(StorageError, match="rootvg"):
        await wrong.list_disks()


# -- what a real VIOS does that the recorded responses do not show ------------------------


async def _until(done: Callable[[], bool]) -> None:
    """Wait for ``done()`` (something another thread does), checking every 10 ms."""
    for _ in range(3000):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("it never happened")


async def test_a_publish_waits_for_a_copy_whose_unconditional_put_would_undo_it(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    cache_disk = (
        await cache.ensure(glance_server.create_image(disk_image(MiB, seed=70)))
    ).cache_disk
    other = await vg.create_partial(partial_disk_name(), 4)
    pvm.reading.clear()
    await other.write(b"data")
    await asyncio.to_thread(pvm.reading.wait, 30)  # its disk is made; the upload is reading
    pvm.hold_copy = threading.Event()
    clone = asyncio.create_task(vg.clone(cache_disk, "b_interleaved"))
    await asyncio.to_thread(pvm.copy_held.wait, 30)  # crt_vdisk has read the VG; PUT in flight

    publish = asyncio.create_task(other.publish("i_other"))
    await _until(lambda: publish.done() or vg.waiting_changes > 0)
    pvm.hold_copy.set()
    await asyncio.gather(clone, publish)

    # without the change lock the copy's PUT (the VG as read before the rename) undid it
    assert {"i_other", "b_interleaved", cache_disk} <= set(pvm.names())
    assert pvm.content("i_other") == b"data" and other.name not in pvm.names()


async def test_a_change_waits_for_another_process_holding_the_vg_s_change_lock(
    vg: PowerVMVG, pvm: FakePowerVM
) -> None:
    import sys

    hold = "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    hold += "print('held', flush=True); sys.stdin.read()"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        hold,
        str(vg.state_dir / "vg.lock"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert await holder.stdout.readline() == b"held\n"
        delete = asyncio.create_task(vg.delete("test"))
        await _until(lambda: vg.waiting_changes > 0)
        assert "test" in pvm.names()  # waiting: nothing changed yet
    finally:
        holder.stdin.close()
        await holder.wait()
    await delete
    assert "test" not in pvm.names()


async def test_the_adapter_has_nova_powervm_s_helpers_and_a_busy_vios_is_asked_again(
    pvm: FakePowerVM, tmp_path: Path, glance_server: GlanceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    vg = open_vg(f"powervm:host=hmc1.example,user=u,vg={VG_NAME},state_dir={tmp_path}")
    cache = ImageCache(vg, GlanceClient(glance_server.url))
    data = disk_image(MiB, seed=71)
    image = glance_server.create_image(data)
    try:
        pvm.busy = 2  # the disk's creation, twice
        await cache.ensure(image)
        pvm.busy = 1  # the copy
        deployed = await cache.deploy(image, str(uuid.uuid4()))
    finally:
        await cache.close()

    assert pvm.adapters_built == 1
    assert pvm.helpers == [log_helper.log_helper, vios_busy.vios_busy_retry_helper]
    assert pvm.busy_answers == 3 and pvm.sleeps == [5, 10, 5]  # nova-powervm's waits
    assert vios_busy.vios_busy_retry_helper not in pvm.helpers_of["upload_file"]  # read once
    assert pvm.content(deployed.disk) == data


@pytest.mark.parametrize("how", ["ignores", "refuses"])
async def test_a_vios_that_ignores_renames_gets_a_copy_of_the_verified_disk_instead(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer, how: str
) -> None:
    pvm.ignore_renames, pvm.refuse_renames = how == "ignores", how == "refuses"
    data = disk_image(MiB, seed=72)
    image = glance_server.create_image(data)

    ensured = await cache.ensure(image)  # the rename "succeeded", and was not done

    partial = pvm.ops()[0][1]
    assert [c for c in pvm.ops() if c[0] != "upload"] == [
        ("create", partial),
        ("copy", partial, ensured.cache_disk),
        ("delete", partial),
    ]
    assert _leftovers(pvm) == [ensured.cache_disk] and pvm.content(ensured.cache_disk) == data
    assert await vg.disk_identity(ensured.cache_disk) == DiskIdentity(image, len(data))
    deployed = await cache.deploy(image, str(uuid.uuid4()))
    assert deployed.outcome is Outcome.HIT and pvm.content(deployed.disk) == data


@pytest.mark.parametrize("which", ["cache disk", "instance disk"])
async def test_a_name_taken_in_another_vg_of_the_vios_is_refused(
    cache: ImageCache, pvm: FakePowerVM, glance_server: GlanceServer, which: str
) -> None:
    image = glance_server.create_image(disk_image(MiB, seed=73))
    instance = str(uuid.uuid4())
    if which == "instance disk":
        await cache.ensure(image)
    taken = (
        instance_disk_name(instance) if which == "instance disk" else next(cache_disk_names(image))
    )
    pvm.other_vg.virtual_disks[0].name = taken  # AIX: one LV name per VIOS

    with pytest.raises(DiskExists, match=f"{taken} already exists on this VIOS.*rootvg"):
        await cache.deploy(image, instance)

    assert taken not in pvm.names()
    assert [n for n in _leftovers(pvm) if not n.startswith("i_")] == []


async def test_stale_etags_on_a_delete_and_a_growth_are_read_again_and_retried(
    vg: PowerVMVG, pvm: FakePowerVM
) -> None:
    partial = await vg.create_partial(partial_disk_name(), 3)
    await partial.write(b"abc")
    pvm.stale_puts = 2  # the grow-and-rename meets two changes by another client
    await partial.publish("b_grown", 2 << 30)
    pvm.stale_puts = 2  # and so does the delete (pypowervm's rm_vg_storage retries itself)
    await vg.delete("test")

    assert [c for c in pvm.calls if c[0] == "etag_mismatch"] == [("etag_mismatch",)] * 4
    assert pvm.names() == ["b_grown"] and pvm.disk("b_grown").capacity == 2


async def test_the_label_none_that_vdisk_bld_writes_is_no_identity(
    vg: PowerVMVG, pvm: FakePowerVM
) -> None:
    t = vg.target_sync()
    pvm_stg.crt_vdisk(pvm.adpt, t.vios_uuid, t.vg_uuid, "b_nolabel", 1)  # VDisk.bld: "None"
    assert pvm.disk("b_nolabel").label == "None"
    assert await vg.disk_identity("b_nolabel") is None


async def test_a_full_vg_refuses_a_download_and_a_copy_as_insufficient_space(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    image = glance_server.create_image(disk_image(MiB, seed=76))
    pvm.set_free(1)
    await cache.ensure(image)  # its cache disk takes the last GB
    assert pvm.free_gb == 0 and await vg.reserves_space()  # counted once, by the VIOS

    with pytest.raises(InsufficientSpace, match=r"needs 1 GB .* 0 GB free"):
        await cache.deploy(image, str(uuid.uuid4()))
    pvm.set_free(2)
    with pytest.raises(InsufficientSpace, match=r"needs 3 GB .* 2 GB free"):
        await cache.deploy(image, str(uuid.uuid4()), size=3 << 30)
    with pytest.raises(InsufficientSpace, match="needs 3 GB"):
        await vg.create_partial(partial_disk_name(), (2 << 30) + 1)

    assert [n for n in _leftovers(pvm) if not n.startswith("i_")] == []


async def test_a_copy_that_timed_out_is_left_to_the_vios_then_swept(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    image = glance_server.create_image(disk_image(MiB, seed=77))
    await cache.ensure(image)
    instance = str(uuid.uuid4())
    pvm.copy_times_out = True

    with pytest.raises(StorageError, match="timed out"):
        await cache.deploy(image, instance)
    disk = instance_disk_name(instance)
    assert disk in pvm.names()  # the VIOS may still be writing it: not removed now
    assert await vg.remove_dead_temporaries() == [] and disk in pvm.names()

    record = vg.state_dir / "timed_out" / f"{disk}.json"  # marked two hours ago
    record.write_text(json.dumps({"seen": json.loads(record.read_text())["seen"] - TIMED_OUT}))
    assert await vg.remove_dead_temporaries() == [disk]
    assert disk not in pvm.names() and not record.exists()


async def test_the_file_a_failed_clean_up_left_is_removed_later(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    pvm.file_delete_fails = 1
    await cache.ensure(glance_server.create_image(disk_image(MiB, seed=74)))
    assert len(pvm.files_left) == 1  # a VIOS keeps 100 of them

    await vg.remove_dead_temporaries()

    assert pvm.files_left == set()


async def test_copies_are_serialized_per_vg_and_deploys_still_share_their_looks(
    pvm: FakePowerVM, vg: PowerVMVG, glance_server: GlanceServer
) -> None:
    cache = ImageCache(vg, GlanceClient(glance_server.url), CacheSettings(max_clones=8))
    image = glance_server.create_image(disk_image(MiB, seed=75))
    try:
        await cache.ensure(image)
        pvm.copy_seconds = 0.05
        start = time.monotonic()
        results = await asyncio.gather(*(cache.deploy(image, str(uuid.uuid4())) for _ in range(8)))
        elapsed = time.monotonic() - start
    finally:
        await cache.close()

    assert len({r.disk for r in results}) == 8
    # one copy at a time: crt_vdisk's PUT is unconditional, so a copy running beside another
    # could drop it (docs/powervm.md, "Concurrency"); the time is measured, not asserted
    assert pvm.max_copies_running == 1
    print(f"8 warm deploys, copies of 0.05 s: {elapsed:.2f} s ({elapsed / 0.05:.1f} copy times)")


# -- the bounded buffer -------------------------------------------------------------------


async def _uploading(vg: PowerVMVG) -> PowerVMPartialDisk:
    """The partial disk being uploaded, once its buffer got half a MiB."""
    for _ in range(3000):
        partial = next(iter(vg.live), None)
        if partial is not None and partial.buffer and partial.buffer.bytes_written >= MiB // 2:
            return partial
        await asyncio.sleep(0.01)
    raise AssertionError("the download never reached the upload buffer")


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_buffer_full_holds_the_writer_until_the_reader_reads() -> None:
    buf = StreamBuffer(4 * 1000)
    chunks = [bytes([n]) * 1000 for n in range(20)]
    accepted = 0

    async def writer() -> None:
        nonlocal accepted
        for c in chunks:
            await buf.put(c)
            accepted += 1
        buf.close()

    task = asyncio.create_task(writer())
    await _settle()
    assert accepted == 4 and not task.done()  # nobody reads: the writer waits, memory stays

    received = bytearray()

    def reader() -> None:
        while piece := buf.read(700):
            received.extend(piece)

    await asyncio.gather(task, asyncio.to_thread(reader))
    assert bytes(received) == b"".join(chunks)
    assert buf.high_water <= 4000


async def test_slow_reader_slows_the_download_instead_of_growing_memory(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    data = disk_image(24 * MiB, seed=58)
    image = glance_server.create_image(data)
    pvm.read_pause = threading.Event()
    task = asyncio.create_task(cache.ensure(image))
    partial = await _uploading(vg)
    await asyncio.sleep(0.2)  # the reader is paused: the download must be waiting by now
    held = partial.buffer.bytes_written

    pvm.read_pause.set()
    result = await task

    assert held <= MiB + (256 << 10)  # the buffer, plus at most one chunk
    assert partial.buffer.high_water <= MiB
    assert max(pvm.lag) <= MiB + (256 << 10)
    assert pvm.content(result.cache_disk) == data


async def test_failing_reader_wakes_a_writer_waiting_for_room() -> None:
    buf = StreamBuffer(1000)
    await buf.put(b"x" * 1000)
    blocked = asyncio.create_task(buf.put(b"y" * 10))
    await _settle()
    assert not blocked.done()

    await asyncio.to_thread(buf.reader_failed, ConnectionError("VIOS went away"))

    with pytest.raises(StorageError, match="VIOS went away"):
        await blocked


async def test_cancelling_the_download_stops_the_upload_thread_and_glance(
    cache: ImageCache, vg: PowerVMVG, pvm: FakePowerVM, glance_server: GlanceServer
) -> None:
    size = 40 * MiB
    image = glance_server.create_image(disk_image(size, seed=59))
    pvm.read_pause = threading.Event()
    task = asyncio.create_task(cache.ensure(image))
    partial = await _uploading(vg)

    task.cancel()
    pvm.read_pause.set()  # the thread reads on, and meets the abort
    with pytest.raises(asyncio.CancelledError):
        await task
    await cache.close()

    assert pvm.uploads_running == 0
    assert not vg.live
    assert _leftovers(pvm) == []
    assert not any(c[0] in ("upload", "rename") for c in pvm.calls)
    assert partial.buffer is not None and partial.buffer.bytes_written < size
    assert glance_server.bytes_served(image) < size


async def test_cancelled_writer_then_abort_makes_the_reader_raise() -> None:
    buf = StreamBuffer(10)
    await buf.put(b"0123456789")
    blocked = asyncio.create_task(buf.put(b"more"))
    await _settle()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    buf.abort("discarded")

    with pytest.raises(OSError, match="discarded"):
        await asyncio.to_thread(buf.read, 5)


# -- the spec and the connection ----------------------------------------------------------


def test_spec_parses_every_key(tmp_path: Path) -> None:
    spec = parse_spec(
        f"host=hmc1.example,vg=rootvg,vios=vios1,user=hscroot,state_dir={tmp_path},"
        "port=12443,protocol=https,buffer_mb=8,password_env=MY_PW"
    )
    assert (spec.host, spec.vg, spec.vios, spec.user) == (
        "hmc1.example",
        "rootvg",
        "vios1",
        "hscroot",
    )
    assert (spec.state_dir, spec.port, spec.buffer_bytes) == (tmp_path, 12443, 8 * MiB)
    assert spec.password_env == "MY_PW"


@pytest.mark.parametrize(
    ("rest", "message"),
    [
        ("vg=rootvg,password=secret", "never given in the spec"),
        ("host=h", "vg=NAME"),
        ("vg=a,colour=blue", "not one of"),
        ("vg=a,vg=b", "given twice"),
        ("vg=a,port=x", "not a whole number"),
        ("vg=a,protocol=ftp", "not http or https"),
    ],
)
def test_bad_spec_is_one_clear_line(rest: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as err:
        parse_spec(rest)
    assert "\n" not in str(err.value) and "secret" not in str(err.value)


def test_default_state_dir_is_keyed_by_host_and_vg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/state")
    assert parse_spec("vg=rootvg").default_state_dir() == Path(
        "/state/pvmcache_async/powervm/local_rootvg"
    )
    # naming the VIOS or not, one VG has one directory (and a second VG of that name on
    # another VIOS is refused there: test_a_state_directory_serves_one_vg_...)
    assert parse_spec("vios=vios1,vg=rootvg").default_state_dir() == Path(
        "/state/pvmcache_async/powervm/local_rootvg"
    )
    assert (
        parse_spec("vg=rootvg,host=hmc1").default_state_dir()
        != parse_spec("vg=rootvg,host=hmc2").default_state_dir()
    )


async def test_open_vg_connects_with_the_password_from_the_environment(
    pvm: FakePowerVM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    vg = open_vg(f"powervm:host=hmc1.example,user=hscroot,vg={VG_NAME},state_dir={tmp_path}")
    try:
        assert [d.name for d in await vg.list_disks()] == ["test"]
    finally:
        await vg.close()

    session = pvm_adpt.Session  # patched by pypowervm's SessionFx inside AdapterFx
    kwargs = session.call_args.kwargs
    assert (kwargs["host"], kwargs["username"], kwargs["password"]) == (
        "hmc1.example",
        "hscroot",
        "s3cret-pw",
    )
    assert "s3cret" not in vg.spec and vg.state_dir == tmp_path


def test_remote_host_without_password_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(InvalidInput, match=PASSWORD_ENV):
        connect(parse_spec("host=hmc1,user=u,vg=rootvg"))


def test_logon_failure_is_a_storage_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    with pytest.raises(StorageError, match="cannot log on") as err:
        connect(parse_spec(f"host=127.0.0.1,port={_closed_port()},user=u,vg=rootvg"))
    assert "s3cret" not in str(err.value) and err.value.__cause__ is None


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("spec", "command", "message"),
    [
        ("powervm:vg=rootvg,password=hunter2", ["ls"], "never given in the spec"),
        (
            "powervm:host=127.0.0.1,port={port},user=u,vg=rootvg,state_dir={state}",
            ["prefetch", str(uuid.UUID(int=7))],
            "cannot log on",
        ),
    ],
)
def test_cli_powervm_failure_is_one_line_without_the_password(
    spec: str, command: list[str], message: str, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PVMCACHE_POWERVM_PASSWORD="hunter2")
    vg = spec.format(port=_closed_port(), state=tmp_path)
    glance = ["--glance-url", "http://127.0.0.1:9"]  # never reached: the VG fails first
    run = subprocess.run(
        [sys.executable, "-m", "pvmcache_async", *glance, "--vg", vg, *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "hunter2" not in run.stderr + run.stdout


async def test_short_stream_is_not_published(vg: PowerVMVG, pvm: FakePowerVM) -> None:
    partial = await vg.create_partial("p_short", 10)
    await partial.write(b"12345")
    with pytest.raises(StorageError, match="got 5 bytes, not 10"):
        await partial.publish("i_short")
    await partial.discard()

    assert pvm.names() == ["test"]
    assert not any(c[0] in ("upload", "rename") for c in pvm.calls)


async def test_a_lost_index_is_rebuilt_from_the_disks_labels(
    cache: ImageCache, pvm: FakePowerVM, tmp_path: Path, glance_server: GlanceServer
) -> None:
    data = disk_image(MiB, seed=59)
    image = glance_server.create_image(data)
    cache_disk = (await cache.ensure(image)).cache_disk
    (tmp_path / "state" / "index.sqlite").unlink()

    vg = PowerVMVG(lambda: pvm.adpt, VG_NAME, state_dir=tmp_path / "state", buffer_bytes=MiB)
    again = ImageCache(vg, GlanceClient(glance_server.url))
    try:
        assert [(e.image_id, e.cache_disk, e.size) for e in await again.entries()] == [
            (image, cache_disk, len(data))
        ]
        deployed = await again.deploy(image, str(uuid.uuid4()))
    finally:
        await again.close()
    assert deployed.outcome is Outcome.HIT
    assert pvm.content(deployed.disk) == data
    assert glance_server.file_requests(image) == 1


@pytest.mark.parametrize("plant", ["dev-zero link", "fifo", "deep json", "future time"])
async def test_planted_powervm_state_records_are_one_warning_never_a_hang_or_a_crash(
    cache: ImageCache,
    vg: PowerVMVG,
    pvm: FakePowerVM,
    glance_server: GlanceServer,
    caplog: pytest.LogCaptureFixture,
    plant: str,
) -> None:
    image = glance_server.create_image(disk_image(MiB, seed=78))
    await cache.ensure(image)
    instance = str(uuid.uuid4())
    pvm.copy_times_out = True
    with pytest.raises(StorageError, match="timed out"):
        await cache.deploy(image, instance)
    disk = instance_disk_name(instance)
    # what an operator (or an attacker with the state directory) leaves in place of records
    records = [vg.state_dir / "timed_out" / f"{disk}.json"]
    records += list((vg.state_dir / "disks").glob("*.json"))  # the exact sizes of our disks
    for record in records:
        record.unlink()
        if plant == "dev-zero link":
            os.symlink("/dev/zero", record)
        elif plant == "fifo":
            os.mkfifo(record)
        elif plant == "deep json":
            record.write_text("[" * 200_000 + "]" * 200_000)
        else:
            record.write_text(json.dumps({"seen": 1e300, "udid": "x", "size": 1}))

    with caplog.at_level(logging.WARNING):
        swept = await asyncio.wait_for(vg.remove_dead_temporaries(), 60)
        listed = await asyncio.wait_for(vg.list_disks(), 60)
    entry = await cache.ensure(image)  # a hit: the cache disk is listed and used still
    assert entry.outcome is Outcome.HIT and entry.cache_disk in {d.name for d in listed}
    if plant == "future time":  # counted from now: not removed at once, and not immune
        assert swept == [] and disk in pvm.names()
        marked = json.loads((vg.state_dir / "timed_out" / f"{disk}.json").read_text())
        assert marked["seen"] <= time.time()
    else:  # unreadable: the mark counts as old, so the disk goes; one warning per file
        assert swept == [disk]
        assert any("ignored, as if absent" in r.getMessage() for r in caplog.records)
