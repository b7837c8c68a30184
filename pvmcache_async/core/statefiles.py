"""Reading the small files under a VG's state directory that other processes write, safely.

Anyone who can write ``.pvmcache`` can put anything there: a symbolic link (to ``/dev/zero``,
to another directory), a FIFO, a device, a file of a gigabyte, JSON nested a million deep.
``read_json`` reads a file only as a regular file in a directory that is not a link, opened
so that it cannot block, at most ``cap`` bytes of it, and parses only shallow JSON. A file
that breaks a rule is treated as absent and logged as one warning naming it and what is wrong
(once, until it reads well again); nothing a file holds makes it raise, hang or take more than
``cap`` bytes of memory.

``open_directory`` is the same rule for a directory that a writer keeps open, so that its
files are made, renamed and removed inside it (``dir_fd``), wherever its path comes to point;
``warn_once`` is the one warning of a file or directory refused. ``read_only`` tells whether a
path's filesystem cannot be written at all.
``replace_json`` (in an open directory) and ``write_json`` (by the directory's path) are the
one way to write such a file: a writer's own fresh temporary, renamed over the name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "MAX_DEPTH",
    "open_directory",
    "read_json",
    "read_only",
    "replace_json",
    "warn_once",
    "write_json",
]

T = TypeVar("T")
MAX_DEPTH = 8  # of arrays and objects in one file: our records are flat
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[^\[\]{}]+")
log = logging.getLogger(__name__)
_warned: set[str] = set()  # the paths whose problem has been told, until they read well
_warned_lock = threading.Lock()


class _Unfit(Exception):
    """What is wrong with a file, in a few words."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    return "a device, not a regular file"


def open_directory(path: Path) -> int:
    """A file descriptor of the directory ``path``, never through a symbolic link: OSError
    otherwise, ELOOP for a link, ENOTDIR for any other file. The caller closes it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except NotADirectoryError:  # what O_NOFOLLOW with O_DIRECTORY says of a link, too
        if os.path.islink(path):
            raise OSError(errno.ELOOP, "a symbolic link", str(path)) from None
        raise


def warn_once(key: Path, message: str) -> None:
    """Log ``message`` as a warning unless one was logged for ``key`` (a state file or
    directory) since it last read well."""
    with _warned_lock:
        if str(key) in _warned:
            return
        _warned.add(str(key))
    log.warning("%s", message)


def read_only(path: Path) -> bool:
    """Whether the filesystem that holds ``path`` (or its nearest existing parent) is mounted
    read-only, or is not writable by this process."""
    for p in (path, *path.parents):
        try:
            return bool(os.statvfs(p).f_flag & os.ST_RDONLY) or not os.access(p, os.W_OK)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


def _read(directory: int, name: str, cap: int) -> bytes:
    """At most ``cap`` bytes of the regular file ``name`` in ``directory``."""
    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block, a device do anything
        raise _Unfit(_kind(st.st_mode))
    if st.st_size > cap:
        raise _Unfit(f"larger than {cap} bytes")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=directory)
    try:
        mode = os.fstat(fd).st_mode  # what was opened, should the name have changed since
        if not stat.S_ISREG(mode):
            raise _Unfit(_kind(mode))
        data = b""
        while len(data) <= cap and (chunk := os.read(fd, cap + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > cap:
        raise _Unfit(f"larger than {cap} bytes")
    return data


def _parse(data: bytes) -> dict[str, Any]:
    """A JSON object nested at most ``MAX_DEPTH`` deep: the depth is counted before parsing,
    so the parser never recurses deeper than that."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _Unfit("not UTF-8 text") from None
    depth = deepest = 0
    for bracket in _BRACKETS.sub("", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise _Unfit(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Unfit(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise _Unfit("not a JSON object")
    return value


def read_json(
    directory: Path, name: str, parse: Callable[[dict[str, Any]], T], *, what: str, cap: int
) -> T | None:
    """The JSON object in file ``name`` of ``directory``, as ``parse`` makes it; None when the
    file is absent or unfit: not a regular file, a link (or in a linked directory), larger than
    ``cap`` bytes, not a shallow JSON object, or refused by ``parse`` (a ValueError or
    TypeError saying why). Unfit is one warning naming ``what`` and the path."""
    path = directory / name
    try:
        fd = open_directory(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        problem = "a symbolic link" if exc.errno == errno.ELOOP else "not a directory"
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            problem = f"unreadable ({exc.strerror or exc})"
        _warn(what, path, f"in a directory that is {problem} ({directory})", key=directory)
        return None
    try:
        value = parse(_parse(_read(fd, name, cap)))
    except FileNotFoundError:
        return None
    except _Unfit as exc:
        _warn(what, path, str(exc))
        return None
    except OSError as exc:
        _warn(what, path, f"unreadable ({exc.strerror or exc})")
        return None
    except (ValueError, TypeError) as exc:
        _warn(what, path, f"not a {what} ({exc})")
        return None
    finally:
        os.close(fd)
    with _warned_lock:
        _warned.difference_update((str(path), str(directory)))
    return value


def write_json(directory: Path, name: str, value: dict[str, Any]) -> None:
    """Replace file ``name`` of ``directory`` with ``value`` as JSON, inside the real directory
    (opened as ``open_directory`` opens it), as ``replace_json`` does. OSError when it cannot
    be written."""
    fd = open_directory(directory)
    try:
        replace_json(fd, name, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp", value)
    finally:
        os.close(fd)


def replace_json(
    directory: int, name: str, tmp: str, value: dict[str, Any], *, mode: int = 0o600
) -> None:
    """Replace file ``name`` of the open ``directory`` with ``value`` as JSON, atomically:
    written to ``tmp``, a fresh file of this writer's own (``O_EXCL|O_NOFOLLOW``; a leftover
    of the same name is removed first), then renamed over the name, which replaces a link
    planted there rather than writing through it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(tmp, flags, mode, dir_fd=directory), "w") as out:
        out.write(json.dumps(value))
    os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)


def _warn(what: str, path: Path, problem: str, *, key: Path | None = None) -> None:
    warn_once(key or path, f"{what} {path}: {problem}; ignored, as if absent")
