"""Validation of ids and the names of disks in the volume group.

Every image id and instance uuid passes through here before it reaches a URL, a disk name
or a path. Disk names fit PowerVM's 15-character limit (``pypowervm.const.MaxLen.VDISK_NAME``)
and use only ``[a-z0-9_]``, so they are also safe file names in a file VG.

* cache disk: ``i_`` + the first 13 characters of the image uuid, dash as underscore
  (``3e865d14-8c1e-...`` -> ``i_3e865d14_8c1e``), as nova-powervm named them. Two images can
  share that prefix, so the index keeps the full image id, and the second image of a prefix
  gets a name derived from a hash of its id (``cache_disk_names`` yields the candidates).
* instance disk: ``b_`` + the first 13 characters of the instance uuid, the same way. Two
  instances can share that prefix too: ``InstanceDisks`` refuses the second while the first's
  disk is being made.
* partial download: ``p_`` + 13 random characters, fresh for every writer: no two writers
  (processes, attempts) ever share one, so publishing a partial can only ever publish what its
  own writer wrote. Never an ``i_`` name, so no partial data is visible under a cache disk
  name. A crash's partials are found by their writers' locks (``storage``), not by name.
* temporary disk (a clone or a deploy's copy being written): ``t_`` + 13 random characters.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import secrets
import uuid
from collections.abc import Iterator

from pvmcache_async.errors import DiskExists, InvalidInput

MAX_DISK_NAME = 15
CACHE_PREFIX = "i_"
INSTANCE_PREFIX = "b_"
PARTIAL_PREFIX = "p_"
CLONE_PREFIX = "t_"
_BODY = MAX_DISK_NAME - 2
# the cache disk names an image may have: its short uuid, then hashed ones (see ingest)
MAX_CACHE_NAMES = 64
_CACHE_NAME = re.compile(r"i_[a-z0-9_]{13}")
_RANDOM_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


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


class InstanceDisks:
    """The instance disks being made, each with the instance it is made for.

    An instance disk's name holds only the first 13 characters of the instance's uuid, so
    two instances can share one: of two deploys racing for one name, one would fail late,
    on the disk the other made. ``claim`` refuses the second at once, naming both."""

    def __init__(self) -> None:
        self._made_for: dict[str, str] = {}  # disk name -> instance uuid

    def claim(self, instance: str, *, image_id: str | None = None) -> str:
        """Claim the name of the (validated) instance's disk and return it; DiskExists when a
        claim on that name is held, for another instance or for this one."""
        disk = instance_disk_name(instance)
        other = self._made_for.get(disk)
        if other == instance:
            raise DiskExists(
                f"instance {instance}: its disk {disk} is being made by another deploy",
                image_id=image_id,
            )
        if other is not None:
            raise DiskExists(
                f"instances {other} and {instance} would both get disk {disk}", image_id=image_id
            )
        self._made_for[disk] = instance
        return disk

    def release(self, disk: str) -> None:
        """Give the name up: its disk is made, or will not be."""
        self._made_for.pop(disk, None)


def partial_disk_name() -> str:
    """A fresh name for a download's partial disk: random, so it is its writer's alone."""
    return PARTIAL_PREFIX + _random_body()


def temporary_disk_name() -> str:
    """A fresh name for a clone's (or a deploy's copy's) temporary disk, its writer's alone."""
    return CLONE_PREFIX + _random_body()


def _random_body() -> str:
    return "".join(secrets.choice(_RANDOM_ALPHABET) for _ in range(_BODY))


def is_cache_disk_name(name: str) -> bool:
    """Whether ``name`` has the shape of a cache disk name (``i_`` + 13 of [a-z0-9_])."""
    return _CACHE_NAME.fullmatch(name) is not None


def is_cache_disk_name_of(image_id: str, name: str) -> bool:
    """Whether ``name`` is one the cache would give the image's cache disk.

    An index row is acted on only when this holds: a row altered to name any other disk (an
    instance disk, another image's cache disk) is never cloned from nor deleted."""
    return is_cache_disk_name(name) and name in itertools.islice(
        cache_disk_names(image_id), MAX_CACHE_NAMES
    )


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a partial download's or a temporary disk's."""
    return name.startswith((PARTIAL_PREFIX, CLONE_PREFIX))
