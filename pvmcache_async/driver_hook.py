"""Where the cache is embedded in nova-compute: the image cache manager and the driver facade.

``ImageManager`` is a ``nova.virt.imagecache.ImageCacheManager``: nova's periodic task
``_run_image_cache_manager_pass`` reaches it through ``driver.manage_image_cache``. It asks
nova which images its instances use (``_list_running_instances``, from nova's database; the
compute manager passes soft-deleted instances too, so they count as users) and lets the cache
remove what is unused, old enough and its own, and then enforce the optional budget.

``DriverHook`` is what a compute driver delegates to: ``manage_image_cache``,
``cache_image``, ``capabilities``, ``create_disk_from_image`` and ``delete_instance_disk``
(and, for a host without the cache, ``stream_disk_from_glance``). Its methods are synchronous,
for nova's native threads, and run on one asyncio loop in a dedicated thread (``LoopThread``),
so that every thread shares one cache: one download per image however many threads ask.

``ImageCacheDriverMixin`` gives a driver all of that from one line: listed before the driver's
base class, it owns the hook and provides nova's image cache methods.

This module translates; the decisions are the cache's (``transfer.ImageCache``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nova.virt import imagecache
from oslo_config import cfg

from pvmcache_async.core import direct
from pvmcache_async.errors import (
    DiskTooSmall,
    GlanceError,
    ImageNotFound,
    ImageUnavailable,
    InvalidInput,
    NoGlanceEndpoint,
)
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.glance.urls import redact_url
from pvmcache_async.models import CacheEntry, DeployResult, EntryState, Outcome, PruneResult
from pvmcache_async.names import instance_disk_name, validate_image_id, validate_instance_uuid
from pvmcache_async.nova import conf as pvm_conf
from pvmcache_async.nova.loop_thread import LoopThread
from pvmcache_async.storage import VolumeGroup, open_vg
from pvmcache_async.transfer import CacheSettings, ImageCache

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Tokens:
    """What nova's own Glance client would send for one request; never in a repr."""

    user: str | None = field(default=None, repr=False)
    service: str | None = field(default=None, repr=False)  # [service_user] token


# The tokens of the nova request a coroutine serves. Set at the top of each call on the loop;
# the download task singleflight starts copies them, so the first caller's tokens fetch.
_NO_TOKENS = _Tokens()  # frozen: one default shared by every context is safe
_TOKENS: contextvars.ContextVar[_Tokens] = contextvars.ContextVar(
    "pvmcache_tokens", default=_NO_TOKENS
)


def _tokens_of(conf: cfg.ConfigOpts, context: Any) -> _Tokens:
    """The request's token, and with ``[service_user] send_service_user_token`` a service
    token beside it, as nova sends to Glance: it lets Glance accept a user token that expires
    while a long download is still running or resuming."""
    user = getattr(context, "auth_token", None)
    if context is None or not conf.service_user.send_service_user_token:
        return _Tokens(user)
    from nova import service_auth

    try:  # nova's session for [glance] and its plugin (cached, keystone only when expired)
        session = service_auth.get_service_auth_session("glance")
        plugin = service_auth.get_service_user_token_auth_plugin(context)
        headers = session.get_auth_headers(auth=plugin) or {}
    except Exception as exc:  # keystoneauth's errors: unreachable, refused, misconfigured
        log.warning(
            "no service token for Glance (%s); sending the request's token alone",
            type(exc).__name__,
        )
        return _Tokens(user)
    return _Tokens(headers.get("X-Auth-Token") or user, headers.get("X-Service-Token"))


@dataclass(slots=True)
class _InstanceLock:
    """One instance's lock and how many calls hold it or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _is_uuid(value: str) -> bool:
    try:
        validate_image_id(value)
    except InvalidInput:
        return False
    return True


class ImageManager(imagecache.ImageCacheManager):  # type: ignore[misc]
    """nova's image cache manager for the cache in a volume group.

    ``call`` runs a coroutine function with the ``ImageCache`` on the cache's loop and returns
    its result (``DriverHook`` provides it). A pass never blocks a deploy and is never held up
    by one: busy images are skipped, not waited for, and looked at again next pass.
    """

    def __init__(
        self,
        call: Callable[[Callable[[ImageCache], Coroutine[Any, Any, Any]]], Any],
        base: str,
        conf: cfg.ConfigOpts,
    ) -> None:
        super().__init__()  # remove_unused_base_images from [image_cache]
        self._call = call
        self._base = base
        self._conf = conf
        self._reset_state()

    def _reset_state(self) -> None:
        self.cached: dict[str, CacheEntry] = {}  # image id -> ready cache entry
        self.used_images: dict[str, tuple[int, int, list[str]]] = {}
        self.in_use_as_of = 0.0
        self.active_images: list[str] = []
        self.result = PruneResult(removed=[], kept=[])

    def _get_base(self) -> str:
        """The volume group holding the cache disks (libvirt's is its ``_base`` directory)."""
        return self._base

    def _scan_base_images(self, base_dir: str) -> None:
        entries: list[CacheEntry] = self._call(lambda cache: cache.entries())
        self.cached = {e.image_id: e for e in entries if e.state is EntryState.READY}

    def _age_and_verify_cached_images(
        self, context: Any, all_instances: Any, base_dir: str
    ) -> None:
        if not self.in_use_as_of:  # called on its own, not from update()
            self._list_in_use(context, all_instances)
        in_use = [i for i in self.used_images if _is_uuid(i)]  # nothing else can be cached
        self.active_images = sorted(set(in_use) & set(self.cached))
        if self.active_images:
            log.info("Active cached images: %s", " ".join(self.active_images))
        ic = self._conf.image_cache
        if not self.remove_unused_base_images:
            # removes nothing, but in-use images still count as used now
            self._call(lambda cache: cache.mark_used(in_use, self.in_use_as_of))
            kept = sorted(e.cache_disk for e in self.cached.values())
            self.result = PruneResult(removed=[], kept=kept)
            return
        pc = self._conf[pvm_conf.GROUP]
        self.result = self._call(
            lambda cache: cache.prune(
                in_use=in_use,
                min_age=float(ic.remove_unused_original_minimum_age_seconds),
                max_bytes=pc.max_bytes,
                max_count=pc.max_count,
                in_use_as_of=self.in_use_as_of,
            )
        )
        if self.result.removed:
            log.info("Removed unused cache disks: %s", " ".join(self.result.removed))

    def _list_in_use(self, context: Any, all_instances: Any) -> None:
        # the time first: the cache keeps every image used since, so a deploy that started
        # during the pass is safe even if its instance is missing from ``all_instances``
        # (nova sets an instance's host before it spawns, so it is normally listed)
        self.in_use_as_of = time.time()
        running = self._list_running_instances(context, all_instances)
        self.used_images = running["used_images"]

    def update(self, context: Any, all_instances: Any) -> None:
        base_dir = self._get_base()
        self._reset_state()
        self._scan_base_images(base_dir)
        self._list_in_use(context, all_instances)
        try:
            self._age_and_verify_cached_images(context, all_instances, base_dir)
        finally:
            self.in_use_as_of = 0.0  # this pass's snapshot is not reused by a later call

    def get_disk_usage(self) -> int:
        """Bytes the cache disks take in the volume group (downloads under way included)."""
        entries: list[CacheEntry] = self._call(lambda cache: cache.entries())
        return sum(e.size for e in entries)


class DriverHook:
    """The image cache as a nova compute driver sees it; synchronous, safe from any thread.

    Off (``[pvmcache] enabled = False``, or a disk driver other than ``localdisk``):
    ``capabilities['has_imagecache']`` is False, ``manage_image_cache`` does nothing,
    ``create_disk_from_image`` returns None (the driver makes the disk its own way) and
    ``cache_image`` raises NotImplementedError, which is nova's own answer for a driver that
    cannot pre-cache (the compute manager reports the image as 'unsupported').
    """

    def __init__(self, conf: cfg.ConfigOpts | None = None, *, disk_driver: str | None = None):
        if conf is None:
            import nova.conf

            conf = nova.conf.CONF
        pvm_conf.register_opts(conf)
        self._conf = conf
        pc = conf[pvm_conf.GROUP]
        self.disk_driver = disk_driver or pc.disk_driver
        self.active = bool(pc.enabled) and self.disk_driver == "localdisk"
        self.settings = CacheSettings(max_downloads=pc.max_downloads, max_clones=pc.max_clones)
        self._loop = LoopThread(executor_workers=self.settings.max_clones + 16)
        self.vg_spec: str = pc.volume_group
        # made on the loop thread when first needed; the cache, once made, owns the other two
        self._vg: VolumeGroup | None = None
        self._direct_swept = False
        self._glance: GlanceClient | None = None
        self._cache: ImageCache | None = None
        self._instance_disks: dict[str, _InstanceLock] = {}  # instance uuid -> its lock, in use
        self.manager = ImageManager(self._with_cache, self.vg_spec, conf)

    @property
    def capabilities(self) -> dict[str, bool]:
        return {"has_imagecache": self.active}

    # -- nova's driver methods ---------------------------------------------------------------

    def manage_image_cache(self, context: Any, all_instances: Any) -> None:
        """One pass of the image cache manager (nova's periodic task)."""
        if self.active:
            self.manager.update(context, all_instances)

    def cache_image(self, context: Any, image_id: str) -> bool:
        """Pre-cache an image: True when this call fetched it; False when it was cached, or
        another call's download of it was under way and this one waited for it."""
        if not self.active:
            raise NotImplementedError("the pvmcache image cache is off on this host")
        result = self._with_cache(lambda cache: cache.ensure(image_id), context, image_id)
        return bool(result.outcome is Outcome.MISS)

    def create_disk_from_image(
        self, context: Any, instance: Any, image_meta: Any
    ) -> DeployResult | None:
        """The instance's disk as a clone of the cached image (downloaded at most once), of
        the flavor's root disk size (``root_disk_size``)."""
        if not self.active:
            return None
        image_id = image_id_of(image_meta)
        uuid = validate_instance_uuid(instance.uuid)
        size = root_disk_size(instance)

        async def create(cache: ImageCache) -> DeployResult:
            async with self._instance_disk(uuid, "create_disk_from_image"):
                return await cache.deploy(image_id, uuid, size=size)

        deployed: DeployResult = self._with_cache(create, context, image_id)
        return deployed

    def stream_disk_from_glance(self, context: Any, instance: Any, image_meta: Any) -> str:
        """The instance's disk streamed straight from Glance, verified, without the cache:
        one GET of the image per call, what a host without the cache does (``direct``).
        Returns the disk's name."""
        image_id = image_id_of(image_meta)
        uuid = validate_instance_uuid(instance.uuid)

        async def stream(url: str | None) -> str:
            glance = self._open_glance(url)
            if glance is None:
                raise NoGlanceEndpoint("no Glance endpoint to fetch it from", image_id=image_id)
            vg = self._open_vg()
            if not self._direct_swept:  # once: what deploys killed mid-way left (owners dead)
                self._direct_swept = True
                await vg.remove_dead_temporaries()
            size = root_disk_size(instance)
            async with self._instance_disk(uuid, "stream_disk_from_glance"):
                disk, _ = await direct.stream_disk(glance, vg, image_id, uuid, size)
            return disk

        return self._on_loop(stream, context, image_id)

    def delete_instance_disk(self, instance: Any) -> None:
        """Remove the instance's disk from the volume group (none there is not an error).

        A create of the instance's disk under way (``create_disk_from_image``,
        ``stream_disk_from_glance``) is waited for, then what it made is removed: once this
        returns, the instance has no disk, whichever thread of nova's asked first."""
        uuid = validate_instance_uuid(instance.uuid)
        disk = instance_disk_name(uuid)

        async def delete(url: str | None) -> None:
            async with self._instance_disk(uuid, "delete_instance_disk"):
                await self._open_vg().delete(disk)

        self._on_loop(delete, None)

    def close(self) -> None:
        """Stop the loop thread: downloads in flight are cancelled and leave nothing behind."""

        async def close_all() -> None:
            cache, glance, vg = self._cache, self._glance, self._vg
            self._cache = self._glance = self._vg = None
            if cache is not None:
                await cache.close()  # its Glance client (if it has one) and the VG too
            if glance is not None and (cache is None or cache.glance is not glance):
                await glance.close()
            if vg is not None and cache is None:
                await vg.close()

        self._loop.stop(close_all)  # every call has ended: no instance lock is left

    # -- internals ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _instance_disk(self, uuid: str, call: str) -> AsyncIterator[None]:
        """Hold the instance's lock: what the hook does to one instance's disk (create,
        stream, delete) runs one call at a time, in the order nova's threads asked (an
        ``asyncio.Lock`` is first come, first served). So a delete waits for a create under
        way and removes what it made, and a create after a delete (a rebuild) does not find
        the old disk. A cancelled waiter leaves the queue; the lock goes with its last user.
        Runs on the loop thread."""
        held = self._instance_disks.get(uuid)
        if held is None:
            held = self._instance_disks[uuid] = _InstanceLock()
        if held.lock.locked():
            log.info("instance %s: %s waits for the call on its disk under way", uuid, call)
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if not held.users:
                del self._instance_disks[uuid]

    def _with_cache(
        self,
        work: Callable[[ImageCache], Coroutine[Any, Any, T]],
        context: Any = None,
        image_id: str | None = None,
    ) -> T:
        return self._on_loop(lambda url: work(self._open_cache(url)), context, image_id)

    def _on_loop(
        self,
        work: Callable[[str | None], Coroutine[Any, Any, T]],
        context: Any = None,
        image_id: str | None = None,
    ) -> T:
        """Run ``work(glance_url)`` on the loop with the request's tokens; the URL is looked
        up only while no Glance client exists yet. If the hook is closed meanwhile, a
        CacheError naming ``image_id`` (``LoopThread.call``)."""
        self._loop.start()  # first: refuses in eventlet mode before anything else happens
        tokens = _tokens_of(self._conf, context)
        url = None
        lookup_error: GlanceError | None = None
        if context is not None and self._glance is None:
            try:
                url = self._glance_url(context)
            except GlanceError as exc:  # a hit needs no Glance: this matters only on a miss
                lookup_error = exc

        async def run() -> T:
            _TOKENS.set(tokens)
            try:
                return await work(url)
            except NoGlanceEndpoint:
                if lookup_error is not None:
                    raise lookup_error from None
                raise

        return self._loop.call(run, image_id=image_id)

    def _open_vg(self) -> VolumeGroup:
        """The one volume group; runs on the loop thread."""
        if self._vg is None:
            self._vg = open_vg(self.vg_spec)
        return self._vg

    def _open_glance(self, url: str | None) -> GlanceClient | None:
        """The one Glance client, made once a URL is known; runs on the loop thread."""
        if self._glance is None and url:
            gc = self._conf.glance
            self._glance = GlanceClient(
                url,
                token=lambda: _TOKENS.get().user,
                service_token=lambda: _TOKENS.get().service,
                ca_file=gc.cafile,
                verify_tls=not gc.insecure,
                read_timeout=self._conf[pvm_conf.GROUP].read_timeout,
            )
        return self._glance

    def _open_cache(self, url: str | None) -> ImageCache:
        """The one ImageCache, made on the loop the first time; runs on the loop thread."""
        if self._cache is None:
            self._cache = ImageCache(self._open_vg(), None, self.settings)
        if self._cache.glance is None:  # a manager pass needs none, a download does
            self._cache.glance = self._open_glance(url)
        return self._cache

    def _glance_url(self, context: Any) -> str:
        """``[pvmcache] glance_url``, else nova's choice: ``[glance] api_servers`` or the
        keystone catalog lookup nova's own Glance client makes with this context."""
        explicit: str | None = self._conf[pvm_conf.GROUP].glance_url
        if explicit:
            return explicit
        from nova.image import glance as nova_glance

        try:
            url = next(nova_glance.get_api_servers(context), None)
        except Exception as exc:  # keystoneauth's errors: no catalog, no endpoint, ...
            raise GlanceError(
                f"no Glance endpoint from nova's [glance] settings: {redact_url(str(exc))}"
            ) from exc
        if not url:
            raise GlanceError("no Glance endpoint from nova's [glance] settings")
        return str(url)


def image_id_of(image_meta: Any) -> str:
    """The image id of nova's ``ImageMeta`` (or of a plain dict, as tests and tools pass)."""
    if isinstance(image_meta, dict):
        return str(image_meta["id"])
    return str(image_meta.id)


def root_disk_size(instance: Any) -> int | None:
    """The instance's root disk in bytes: its flavor's ``root_gb`` GiB, as nova-powervm's
    ``crt_copy_vdisk(..., flavor.root_gb)`` and libvirt's resize make it; None (the image's
    size) for ``root_gb`` 0, nova's "as large as the image", or an instance without a flavor."""
    flavor = instance.flavor if _attr_set(instance, "flavor") else None
    root_gb = getattr(flavor, "root_gb", None) if flavor is not None else None
    return int(root_gb) << 30 if root_gb else None


def _attr_set(obj: Any, name: str) -> bool:
    """Whether a nova object has ``name`` loaded (reading an unset one loads it from the db)."""
    is_set = getattr(obj, "obj_attr_is_set", None)
    return bool(is_set(name)) if is_set is not None else hasattr(obj, name)


@contextlib.contextmanager
def build_errors(image_meta: Any) -> Iterator[None]:
    """Turn the cache's errors into what nova's build expects of a driver's spawn.

    An image that Glance does not have or refuses, or a bad image id, aborts the build (nova's
    ``ImageUnacceptable``): no other host would do better. A flavor's root disk smaller than
    the image is nova's own ``FlavorDiskSmallerThanImage`` (the build aborts, as libvirt's).
    Any other failure passes as it is, and nova may reschedule the build. The instance's
    fault names the image and the cause."""
    try:
        yield
    except DiskTooSmall as exc:
        from nova import exception as nova_exception

        raise nova_exception.FlavorDiskSmallerThanImage(
            flavor_size=exc.disk_size, image_size=exc.image_size
        ) from exc
    except (ImageNotFound, ImageUnavailable, InvalidInput) as exc:
        if isinstance(exc, NoGlanceEndpoint):  # this host's settings: another may have one
            raise
        from nova import exception as nova_exception

        raise nova_exception.ImageUnacceptable(
            image_id=exc.image_id or image_id_of(image_meta), reason=exc.message
        ) from exc


class ImageCacheDriverMixin:
    """The image cache for a nova compute driver; listed before the driver's base class::

        class PowerVMDriver(ImageCacheDriverMixin, driver.ComputeDriver): ...

    It makes one ``DriverHook`` from nova's CONF (``self.image_cache``) and gives the driver
    nova's image cache methods: ``capabilities`` with ``has_imagecache`` merged in,
    ``manage_image_cache``, ``cache_image`` and ``cleanup_host`` (closes the hook, then the
    base's). The driver's own spawn and destroy call ``create_disk_from_image`` (None when
    the cache is off: the driver makes the disk its own way) and ``delete_instance_disk``.
    """

    capabilities: dict[str, Any]  # the base driver's class attribute, shadowed per instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_cache = DriverHook()
        self.capabilities = {**self.capabilities, **self.image_cache.capabilities}

    def manage_image_cache(self, context: Any, all_instances: Any) -> None:
        self.image_cache.manage_image_cache(context, all_instances)

    def cache_image(self, context: Any, image_id: str) -> bool:
        return self.image_cache.cache_image(context, image_id)

    def cleanup_host(self, host: str) -> None:
        try:
            self.image_cache.close()
        finally:
            super().cleanup_host(host)  # type: ignore[misc]

    def create_disk_from_image(
        self, context: Any, instance: Any, image_meta: Any
    ) -> DeployResult | None:
        """The instance's disk from the cache, or None when the cache is off on this host.

        On failure the instance has no disk; errors as ``build_errors`` says."""
        with build_errors(image_meta):
            return self.image_cache.create_disk_from_image(context, instance, image_meta)

    def delete_instance_disk(self, instance: Any) -> None:
        self.image_cache.delete_instance_disk(instance)
