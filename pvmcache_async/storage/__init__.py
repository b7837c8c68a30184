"""Volume group backends behind one protocol (``base``); ``open_vg`` picks one by spec."""

from __future__ import annotations

import os
from pathlib import Path

from pvmcache_async.errors import InvalidInput, shown
from pvmcache_async.storage.base import Capacity, DiskIdentity, DiskInfo, PartialDisk, VolumeGroup

_PATH_MAX = 4096  # Linux's PATH_MAX, with its NUL

__all__ = [
    "Capacity",
    "DiskIdentity",
    "DiskInfo",
    "PartialDisk",
    "VolumeGroup",
    "check_vg_spec",
    "default_vg_spec",
    "open_vg",
]


def default_vg_spec() -> str:
    """The embedded default: a file VG in the per-user data directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"file:{Path(base) / 'pvmcache_async' / 'vg'}"


def open_vg(spec: str, *, create: bool = True) -> VolumeGroup:
    """Open the volume group that ``spec`` names: ``file:PATH`` or ``powervm:...``.

    ``create=False`` (for looking and pruning): a file VG that does not exist is an error
    naming its path, not made anew, so a mistyped path creates nothing.

    A spec that cannot name a VG is InvalidInput saying why (``check_vg_spec``).
    """
    kind, rest = _kind_of(spec)
    if kind == "file":
        from pvmcache_async.storage.filevg import (
            FileVG,  # imported on demand: each backend has its own deps
        )

        return FileVG(_file_vg_path(rest), create=create)
    try:
        from pvmcache_async.storage.powervm.backend import open_powervm_vg  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise InvalidInput(f"VG powervm: the PowerVM backend is unavailable ({exc})") from exc
    vg: VolumeGroup = open_powervm_vg(rest)
    return vg


def check_vg_spec(spec: str) -> None:
    """Raise InvalidInput when ``spec`` cannot name a VG by its form alone, as ``open_vg``
    would; nothing is opened, created or connected to (whether the VG is there is
    ``open_vg``'s to say). Its text is echoed cut short, and a ``powervm:`` spec's key=value
    part not at all (its own parser names the bad item)."""
    kind, rest = _kind_of(spec)
    if kind == "file":
        _file_vg_path(rest)
        return
    try:
        from pvmcache_async.storage.powervm.spec import parse_spec  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return  # no backend to parse it with: open_vg says that, it is not the spec's fault
    parse_spec(rest)


def _kind_of(spec: str) -> tuple[str, str]:
    """(``file`` or ``powervm``, the rest after the colon)."""
    kind, sep, rest = spec.partition(":")
    if (kind == "file" and sep and rest) or (kind == "powervm" and sep):
        return kind, rest
    raise InvalidInput(f"VG {shown(spec)} is not 'file:PATH' or 'powervm:...'")


def _file_vg_path(text: str) -> Path:
    if "\0" in text:
        raise InvalidInput(f"VG file:{shown(text)}: a path cannot hold a NUL character")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~name of no user, or no home directory to expand ~ to
        user = text.partition("/")[0]
        raise InvalidInput(f"VG file:{shown(text)}: {user} is no user's home directory") from None
    if len(os.fsencode(path)) >= _PATH_MAX:
        raise InvalidInput(
            f"VG file:{shown(text)}: the path is longer than the system's limit of "
            f"{_PATH_MAX - 1} bytes"
        )
    return path
