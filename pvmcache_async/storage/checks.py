"""What both backends check and how they report a failure: disk names, and errors as StorageError.

A backend never lets an ``OSError`` or a pypowervm error out: it raises the ``StorageError``
that :func:`storage_error` makes of it, naming what was being done.
"""

from __future__ import annotations

import errno
import re

from pvmcache_async.errors import CacheError, InsufficientSpace, InvalidInput, StorageError

_DISK_NAME = re.compile(r"[A-Za-z0-9_]+")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_disk_name(name: str, longest: int) -> None:
    """Refuse a disk name that is not 1-``longest`` characters of ``[A-Za-z0-9_]``: such a
    name can only be a plain file name, and PowerVM accepts it."""
    if not (len(name) <= longest and _DISK_NAME.fullmatch(name)):
        raise InvalidInput(f"disk name {name!r} is not 1-{longest} characters of [A-Za-z0-9_]")


def cause(exc: BaseException) -> str:
    """The cause of ``exc`` in one line: an OS error's own words, else its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join((str(exc) or type(exc).__name__).split())


def storage_error(what: str, exc: BaseException) -> StorageError:
    """``exc`` as the error of ``what`` (e.g. "cloning i_x to b_y"): a StorageError as it is,
    a full disk or quota as InsufficientSpace, anything else as a StorageError with its cause."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, CacheError):
        return StorageError(f"{what}: {exc}")
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return InsufficientSpace(f"{what}: no space left in the volume group")
    return StorageError(f"{what}: {cause(exc)}")
