"""Validation of ids and the names of disks in the volume group.

Every image id and instance uuid passes through here before it reaches a URL, a disk name
or a path. Disk names fit PowerVM's 15-character limit (``pypowervm.const.MaxLen.VDISK_NAME``)
and use only ``[a-z0-9_]``, so they are also safe file names in a file VG.

* cache disk: ``i_`` + the first 13 characters of the image uuid, dash as underscore
  (``3e865d14-8c1e-...`` -> ``i_3e865d14_8c1e``), as nova-powervm named them. Two images can
  share that prefix, so the index keeps the full image id, and the second image of a prefix
  gets a name derived from a hash of its id (``cache_disk_names`` yields the candidates).
* instance disk: ``b_`` + the first 13 characters of the instance uuid, the same way.
* partial download: ``p_`` + a hash of the image id; never an ``i_`` name, so that no
  partial data is ever visible under a cache disk name, and found again after a crash.
* partial instance disk of a deploy without the cache (``direct``): ``p_`` + the instance
  disk's body; its ``_`` at the ninth character keeps it apart from the hashed ``p_`` names.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator

from .errors import InvalidInput

MAX_DISK_NAME = 15
CACHE_PREFIX = "i_"
INSTANCE_PREFIX = "b_"
PARTIAL_PREFIX = "p_"
CLONE_PREFIX = "t_"
_BODY = MAX_DISK_NAME - 2


def _parse_uuid(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != 36:
        raise InvalidInput(f"{what} {value!r} is not a uuid (8-4-4-4-12 hex digits)")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"{what} {value!r} is not a uuid (8-4-4-4-12 hex digits)") from None
    canonical = str(parsed)
    if canonical != value.lower():  # uuid.UUID also accepts braces, urn: and no dashes
        raise InvalidInput(f"{what} {value!r} is not a uuid (8-4-4-4-12 hex digits)")
    return canonical


def validate_image_id(value: object) -> str:
    """Return the canonical (lower-case) image uuid, or raise InvalidInput."""
    return _parse_uuid(value, "image id")


def validate_instance_uuid(value: object) -> str:
    """Return the canonical (lower-case) instance uuid, or raise InvalidInput."""
    return _parse_uuid(value, "instance uuid")


def _short(canonical_uuid: str) -> str:
    return canonical_uuid[:_BODY].replace("-", "_")


def _hashed(value: str, salt: str = "") -> str:
    digest = hashlib.sha256(f"{salt}{value}".encode()).digest()
    return base64.b32encode(digest).decode().lower()[:_BODY]


def cache_disk_names(image_id: str) -> Iterator[str]:
    """The cache disk names for an image, in order of preference (endless)."""
    yield CACHE_PREFIX + _short(image_id)
    n = 0
    while True:
        yield CACHE_PREFIX + _hashed(image_id, str(n))
        n += 1


def instance_disk_name(instance_uuid: str) -> str:
    """The name of the disk a deploy creates for an instance."""
    return INSTANCE_PREFIX + _short(instance_uuid)


def partial_disk_name(image_id: str) -> str:
    """The name under which the image's download is written until it is verified."""
    return PARTIAL_PREFIX + _hashed(image_id)


def direct_partial_name(instance_uuid: str) -> str:
    """The name under which a deploy without the cache writes the instance's disk."""
    return PARTIAL_PREFIX + _short(instance_uuid)


def is_cache_disk_name(name: str) -> bool:
    return name.startswith(CACHE_PREFIX)
