"""pvmcache_async: each Glance image streamed once into the volume group; every deploy a clone."""

from .errors import (
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
from .glance import GlanceClient
from .models import (
    CacheEntry,
    DeployResult,
    EnsureResult,
    EntryState,
    ImageInfo,
    Outcome,
    PruneResult,
)
from .storage import VolumeGroup, open_vg
from .transfer import CacheSettings, ImageCache

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
