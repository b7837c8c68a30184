"""The nova-compute options of the image cache: one oslo.config group, ``[pvmcache]``.

Registered the way nova drivers register theirs (``register_opts(CONF)``, idempotent). Nova's
own ``[image_cache]`` options are honoured as well: ``remove_unused_base_images`` (False: a
manager pass removes nothing) and ``remove_unused_original_minimum_age_seconds`` (the minimum
time since an image's last use before it may be removed). The Glance endpoint, CA file and TLS
verification come from nova's ``[glance]`` group unless ``glance_url`` overrides the endpoint.
"""

from __future__ import annotations

from oslo_config import cfg

from pvmcache_async.glance.client import DEFAULT_READ_TIMEOUT
from pvmcache_async.transfer import CacheSettings

GROUP = "pvmcache"
_DEFAULTS = CacheSettings()

pvmcache_group = cfg.OptGroup(
    GROUP,
    title="PowerVM image cache options",
    help="The image cache of pvmcache_async: each Glance image is streamed once into the "
    "volume group as a cache disk, and every instance disk is a clone of it.",
)

OPTS = [
    cfg.BoolOpt(
        "enabled",
        default=True,
        help="Cache images in the volume group. When False (or when the disk driver is not "
        "'localdisk'), the driver reports has_imagecache=False, the cache does nothing and "
        "the driver makes each instance's disk its own way (FakeImageCacheDriver streams it "
        "from Glance, one download per instance).",
    ),
    cfg.StrOpt(
        "disk_driver",
        default="localdisk",
        choices=["localdisk", "ssp"],
        help="The PowerVM disk driver of this host. Only 'localdisk' uses this cache; with "
        "'ssp' the shared storage pool does its own image handling and the cache is off.",
    ),
    cfg.StrOpt(
        "volume_group",
        default="file:$state_path/pvmcache/vg",
        help="The volume group holding cache disks and instance disks: 'file:PATH' (a "
        "directory, one file per disk) or 'powervm:...' (the PowerVM backend).",
    ),
    cfg.URIOpt(
        "glance_url",
        schemes=["http", "https"],
        help="The Glance v2 endpoint. Unset (the default): nova's own choice, [glance] "
        "api_servers or else the keystone catalog lookup configured in [glance].",
    ),
    cfg.IntOpt(
        "max_downloads",
        default=_DEFAULTS.max_downloads,
        min=1,
        help="Images downloaded from Glance at once by this nova-compute.",
    ),
    cfg.IntOpt(
        "max_clones",
        default=_DEFAULTS.max_clones,
        min=1,
        help="Instance disks cloned from cache disks at once by this nova-compute.",
    ),
    cfg.FloatOpt(
        "read_timeout",
        default=DEFAULT_READ_TIMEOUT,
        min=1.0,
        help="Seconds a read from Glance may stall before the download fails. There is no "
        "total timeout: a large image may take as long as it needs while data flows.",
    ),
    cfg.IntOpt(
        "max_bytes",
        min=0,
        help="Disk budget of the cache in bytes. When the cache holds more, a manager pass "
        "removes the least recently used images that no instance uses until it fits. Unset: "
        "no byte budget. Images in use are never removed, so the cache may stay over it.",
    ),
    cfg.IntOpt(
        "max_count",
        min=0,
        help="Budget of the cache in images, enforced like max_bytes. Unset: no count budget.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(pvmcache_group)
    conf.register_opts(OPTS, group=pvmcache_group)


def list_opts() -> dict[cfg.OptGroup, list[cfg.Opt]]:
    """For oslo-config-generator (sample config files)."""
    return {pvmcache_group: OPTS}
