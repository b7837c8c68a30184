"""Plain data: what Glance says of an image, what the cache holds, what a call did."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """The fields of a Glance v2 image record that the cache relies on, already validated."""

    id: str
    name: str | None
    size: int
    digest_algo: str  # a hashlib name: "sha512" (os_hash_algo) or "md5" (legacy checksum)
    digest: str  # lower-case hex


class Outcome(enum.StrEnum):
    """How ``ensure`` obtained the cache disk."""

    MISS = "miss"  # this call downloaded the image
    JOINED = "joined"  # this call waited on a download already under way
    HIT = "hit"  # the image was already cached


class EntryState(enum.StrEnum):
    """The life of a cache disk in the index."""

    FILLING = "filling"  # a download is (or was, until a crash) writing its partial disk
    READY = "ready"  # complete, verified, published under its cache disk name


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One image in the cache index. Only disks with an entry were created by the cache."""

    image_id: str
    cache_disk: str
    size: int
    digest_algo: str
    digest: str
    created: float  # unix time
    last_used: float  # unix time
    state: EntryState
    # created or last_used was ahead of the clock when read: counted as the time of reading
    clock_ahead: bool = False


@dataclass(frozen=True, slots=True)
class EnsureResult:
    """What ``ImageCache.ensure`` did for one image."""

    image_id: str
    cache_disk: str
    outcome: Outcome
    bytes_fetched: int  # bytes this call read from Glance: 0 unless the outcome is MISS
    seconds: float


@dataclass(frozen=True, slots=True)
class DeployResult:
    """What ``ImageCache.deploy`` did for one instance."""

    image_id: str
    instance: str
    disk: str  # the instance disk's name in the VG
    cache_disk: str
    outcome: Outcome
    bytes_fetched: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PruneResult:
    """Which cache disks a prune removed and which it kept."""

    removed: list[str]
    kept: list[str]
