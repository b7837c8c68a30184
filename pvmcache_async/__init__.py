"""pvmcache_async: each Glance image streamed once into the volume group; every deploy a clone."""

from pvmcache_async.errors import (
    CacheError,
    DiskExists,
    GlanceError,
    ImageNotFound,
    ImageUnavailable,
    InsufficientSpace,
    IntegrityError,
    InvalidInput,
    NoGlanceEndpoint,
    StorageError,
)
from pvmcache_async.glance.client import GlanceClient
from pvmcache_async.models import (
    CacheEntry,
    DeployResult,
    EnsureResult,
    EntryState,
    ImageInfo,
    Outcome,
    PruneResult,
)
from pvmcache_async.storage import VolumeGroup, open_vg
from pvmcache_async.transfer import CacheSettings, ImageCache

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheSettings",
    "DeployResult",
    "DiskExists",
    "EnsureResult",
    "EntryState",
    "GlanceClient",
    "GlanceError",
    "ImageCache",
    "ImageInfo",
    "ImageNotFound",
    "ImageUnavailable",
    "InsufficientSpace",
    "IntegrityError",
    "InvalidInput",
    "NoGlanceEndpoint",
    "Outcome",
    "PruneResult",
    "StorageError",
    "VolumeGroup",
    "open_vg",
]
