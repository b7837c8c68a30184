"""``FakeImageCacheDriver``: nova's fake compute driver with the image cache, loadable by name.

As nova's own ``fake.FakeDriver`` serves nova's tests and demos, this driver serves ours: a
real nova-compute loads it with ``[DEFAULT] compute_driver =
pvmcache_ext.fake.FakeImageCacheDriver`` (the shim ``nova.virt.pvmcache_ext.fake`` re-exports
it, as nova loads drivers only from ``nova.virt``). Everything a hypervisor would do is
FakeDriver's; the instance's disk is real: spawn makes it in the volume group and destroy
removes it.

* Cache on: the disk is a clone of the cached image (``DriverHook.create_disk_from_image``).
* Cache off (``[pvmcache] enabled = False``): the disk is streamed from Glance by this spawn
  alone, verified (``DriverHook.stream_disk_from_glance``): a host without the cache, one GET
  per server.

A spawn that fails leaves no disk behind, and nova marks the instance ERROR with the cause
as its fault (``driver_hook.build_errors``).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import nova.virt.node
from nova.virt import fake

from pvmcache_async.driver_hook import ImageCacheDriverMixin, build_errors

log = logging.getLogger(__name__)


class FakeImageCacheDriver(ImageCacheDriverMixin, fake.FakeDriver):  # type: ignore[misc]
    """nova's FakeDriver whose instances have real disks, made through the image cache."""

    def spawn(
        self,
        context: Any,
        instance: Any,
        image_meta: Any,
        injected_files: Any,
        admin_password: Any,
        allocations: Any,
        network_info: Any = None,
        block_device_info: Any = None,
        power_on: bool = True,
        accel_info: Any = None,
    ) -> None:
        if _has_image(image_meta):  # FakeDriver spawns for a migration without one
            self._make_disk(context, instance, image_meta)
        try:
            super().spawn(
                context, instance, image_meta, injected_files, admin_password, allocations,
                network_info, block_device_info, power_on, accel_info,
            )  # fmt: skip
        except BaseException:
            self.delete_instance_disk(instance)
            raise

    def destroy(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_device_info: Any = None,
        destroy_disks: bool = True,
        destroy_secrets: bool = True,
    ) -> None:
        super().destroy(
            context, instance, network_info, block_device_info, destroy_disks, destroy_secrets
        )
        if destroy_disks:
            self.delete_instance_disk(instance)

    # nova's FakeDriver makes its node uuids up anew in each process (uuidsentinel): a
    # restarted nova-compute would not find its compute node again. One uuid per node name,
    # the same across restarts, as a real driver's node keeps its identity.
    def init_host(self, host: str) -> None:
        super().init_host(host)
        if nova.virt.node.read_local_node_uuid() is None:  # what nova checks on a restart
            nova.virt.node.write_local_node_uuid(node_uuid(host))

    def get_available_resource(self, nodename: str) -> dict[str, Any]:
        resources: dict[str, Any] = super().get_available_resource(nodename)
        if resources:
            resources["uuid"] = node_uuid(nodename)
        return resources

    def get_nodenames_by_uuid(self, refresh: bool = False) -> dict[str, str]:
        return {node_uuid(n): n for n in self.get_available_nodes(refresh)}

    def _make_disk(self, context: Any, instance: Any, image_meta: Any) -> None:
        made = self.create_disk_from_image(context, instance, image_meta)
        if made is not None:
            what = f"cloned from {made.cache_disk} ({made.outcome.value})"
            log.info("instance %s: disk %s %s", instance.uuid, made.disk, what)
            return
        with build_errors(image_meta):  # the cache is off: the disk is made our own way
            disk = self.image_cache.stream_disk_from_glance(context, instance, image_meta)
        log.info("instance %s: disk %s streamed from Glance (no image cache)", instance.uuid, disk)


def node_uuid(nodename: str) -> str:
    """The stable uuid of a fake node: the same in every process and after restarts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pvmcache-fake-node:{nodename}"))


def _has_image(image_meta: Any) -> bool:
    if image_meta is None:
        return False
    if isinstance(image_meta, dict):
        return bool(image_meta.get("id"))
    return bool(image_meta.obj_attr_is_set("id") and image_meta.id)
