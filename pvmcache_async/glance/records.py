"""A Glance v2 image record, validated for caching: active, raw, a size, a digest to verify."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pvmcache_async.errors import GlanceError, ImageUnavailable, shown
from pvmcache_async.models import ImageInfo

MAX_IMAGE_SIZE = 1 << 50  # 1 PiB: anything larger is a corrupt record, not an image
_HEX = re.compile(r"[0-9a-f]+")


def parse_image(image_id: str, record: object) -> ImageInfo:
    """Validate a Glance v2 image record for caching; raise a clear error if it cannot be."""
    if not isinstance(record, dict):
        raise GlanceError(
            "Glance sent an image record that is not a JSON object", image_id=image_id
        )
    if record.get("id", image_id) != image_id:
        raise GlanceError(
            f"Glance sent the record of another image ({record.get('id')!r})", image_id=image_id
        )
    status = record.get("status")
    if status != "active":
        raise ImageUnavailable(f"is {status!r} in Glance, not 'active'", image_id=image_id)
    disk_format = record.get("disk_format")
    if disk_format != "raw":
        raise ImageUnavailable(
            f"has disk_format {disk_format!r}; only 'raw' images can be cached", image_id=image_id
        )
    size = record.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_IMAGE_SIZE:
        raise GlanceError(f"Glance gave an invalid size {size!r}", image_id=image_id)
    if size == 0:
        raise ImageUnavailable("has no data (size 0)", image_id=image_id)
    algo, digest = _digest_of(image_id, record)
    name = record.get("name")
    return ImageInfo(
        id=image_id,
        name=name if isinstance(name, str) else None,
        size=size,
        digest_algo=algo,
        digest=digest,
    )


def _digest_of(image_id: str, record: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) to verify the data against.

    ``os_hash_algo``/``os_hash_value`` when Glance gives either (any algorithm hashlib has,
    checked against its digest size); md5 ``checksum`` only when Glance gives neither
    (images uploaded before Glance had them). Never a silent fall back to md5.
    """
    algo, value = record.get("os_hash_algo"), record.get("os_hash_value")
    if algo is None and value is None:
        algo, value, field = "md5", record.get("checksum"), "checksum"
        if value is None:
            raise ImageUnavailable(
                "has no checksum (neither os_hash_value nor checksum) to verify against",
                image_id=image_id,
            )
    else:
        field = "os_hash_value"
        if not isinstance(algo, str):
            raise ImageUnavailable(
                f"has an os_hash_value but no usable os_hash_algo ({shown(algo)})",
                image_id=image_id,
            )
    try:
        size = hashlib.new(algo).digest_size
    except (ValueError, TypeError):
        size = 0
    if size == 0:  # unknown, or a variable-length digest (shake_*) with no length to check
        raise ImageUnavailable(
            f"Glance hashes it with os_hash_algo {shown(algo)}, which this host's hashlib "
            "cannot compute: its data cannot be verified",
            image_id=image_id,
        )
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value.lower()):
        raise ImageUnavailable(
            f"has no usable {field}: {shown(value)} is not a {algo} digest ({2 * size} hex digits)",
            image_id=image_id,
        )
    return algo, value.lower()
