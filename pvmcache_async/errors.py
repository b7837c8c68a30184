"""The one exception hierarchy of pvmcache_async.

Every error the cache raises is a :class:`CacheError`. Its ``str()`` is a single line that
names the image (when there is one) and the cause, so that the command line and nova's log
can print it as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SHOWN_CHARS = 120  # of an untrusted value, echoed in a message


def shown(value: object) -> str:
    """An untrusted value as a message shows it: its repr, cut short (a 10 KB argument
    makes a one-line error, not a screenful)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


class CacheError(Exception):
    """Base class: a failure that names the image it concerns and why."""

    def __init__(self, message: str, *, image_id: str | None = None) -> None:
        self.image_id = image_id
        self.message = " ".join(message.split())  # always one line
        super().__init__(f"image {image_id}: {self.message}" if image_id else self.message)


class InvalidInput(CacheError):
    """An argument was malformed: an image id that is not a uuid, a bad VG spec, ..."""


class DiskTooSmall(InvalidInput):
    """The instance disk asked for (a flavor's root disk) is smaller than its image."""

    def __init__(self, message: str, *, image_id: str | None, disk_size: int, image_size: int):
        self.disk_size = disk_size
        self.image_size = image_size
        super().__init__(message, image_id=image_id)


def check_disk_fits(image_id: str, image_size: int, size: int | None) -> None:
    """Refuse an instance disk of ``size`` bytes (None: the image's) that cannot hold the
    image: ``DiskTooSmall``."""
    if size is not None and size < image_size:
        raise DiskTooSmall(
            f"an instance disk of {size} bytes cannot hold the image's {image_size} bytes",
            image_id=image_id,
            disk_size=size,
            image_size=image_size,
        )


class NoGlanceEndpoint(InvalidInput):
    """An image is not cached and no Glance endpoint is configured to fetch it from."""


class GlanceError(CacheError):
    """Talking to Glance failed: transport error, unexpected status, malformed answer."""

    def __init__(
        self, message: str, *, image_id: str | None = None, status: int | None = None
    ) -> None:
        self.status = status
        super().__init__(message, image_id=image_id)


class ImageNotFound(GlanceError):
    """Glance does not know the image (404): unknown or deleted."""


class ImageUnavailable(GlanceError):
    """The image exists but cannot be cached: not active, not raw, no data, deactivated."""


class IntegrityError(CacheError):
    """The bytes received do not match the image: wrong digest or wrong length."""


class StorageError(CacheError):
    """The volume group refused an operation."""


class UntrustedFile(StorageError):
    """A file where the cache keeps its own (a lock file, a temporary disk) is not one it made:
    a symbolic link, a FIFO, a directory. Never followed nor used; a sweep skips it, warning."""


class InsufficientSpace(StorageError):
    """The volume group has no room for the image."""


class DiskExists(StorageError):
    """A disk with the target name already exists; it is never overwritten."""


class ReadOnly(StorageError):
    """The volume group cannot be written (mounted read-only, or not by this user): what
    only looks still works, and what must write says so."""


class AuthError(CacheError):
    """Keystone refused or could not be asked: wrong credentials, unreachable, no token."""


@contextlib.contextmanager
def naming_image(image_id: str) -> Iterator[None]:
    """A ``StorageError`` raised inside that names no image comes out naming ``image_id``
    (the VG and the index cannot name it: they know disks and rows). The one place that adds it."""
    try:
        yield
    except StorageError as exc:
        if exc.image_id is None:
            raise type(exc)(exc.message, image_id=image_id) from exc
        raise
