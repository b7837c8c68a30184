"""A deploy without the cache: the instance's disk streamed straight from Glance.

What a host without an image cache does: one GET of the image's data per deploy, however many
deploys of the image run at once. It is the storm's ``no-cache`` baseline and the disk of
nova's fake driver on a host with ``[pvmcache] enabled = False``.

The data is written under a partial disk of its own (a fresh ``p_`` name owned by this writer,
as every partial is; see ``storage.base``) and published as the instance's disk only once the
Glance client has verified its length and digest; on any failure or cancellation the partial
is discarded, so nothing unverified is ever visible under the instance's disk name.
"""

from __future__ import annotations

from pvmcache_async.aio import finish
from pvmcache_async.errors import DiskExists, check_disk_fits
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.names import (
    instance_disk_name,
    partial_disk_name,
    validate_image_id,
    validate_instance_uuid,
)
from pvmcache_async.storage import VolumeGroup


async def stream_disk(
    glance: GlanceClient,
    vg: VolumeGroup,
    image_id: str,
    instance_uuid: str,
    size: int | None = None,
) -> tuple[str, int]:
    """Write the instance's disk from the image; return its name and the bytes fetched.

    ``size``: the disk's size in bytes (a flavor's root disk), the image then zeros; None: the
    image's. Smaller than the image: ``DiskTooSmall``, before anything is written.
    An existing disk of the instance is never replaced (``DiskExists``). A partial that a
    crashed deploy left is its dead writer's: the VG's sweep of dead temporaries removes it.
    """
    image_id = validate_image_id(image_id)
    instance = validate_instance_uuid(instance_uuid)
    disk = instance_disk_name(instance)
    if await vg.disk_size(disk) is not None:
        raise DiskExists(f"instance {instance} already has a disk {disk}", image_id=image_id)
    info = await glance.get_image(image_id)
    check_disk_fits(image_id, info.size, size)
    partial = await vg.create_partial(partial_disk_name(), info.size)
    try:
        fetched = await glance.download(info, partial)
        await partial.publish(disk, size)
    except BaseException:
        await finish(partial.discard())
        raise
    return disk, fetched
