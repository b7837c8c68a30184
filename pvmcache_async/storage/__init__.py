"""Volume group backends behind one protocol (``base``); ``open_vg`` picks one by spec."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidInput
from .base import Capacity, DiskIdentity, DiskInfo, PartialDisk, VolumeGroup

__all__ = [
    "Capacity",
    "DiskIdentity",
    "DiskInfo",
    "PartialDisk",
    "VolumeGroup",
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
    naming its path, not made anew, so a mistyped path creates nothing."""
    kind, sep, rest = spec.partition(":")
    if kind == "file" and sep and rest:
        from .filevg import FileVG  # imported on demand: each backend has its own deps

        return FileVG(Path(rest).expanduser(), create=create)
    if kind == "powervm" and sep:
        try:
            from .powervm import open_powervm_vg  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise InvalidInput(f"VG {spec!r}: the PowerVM backend is unavailable ({exc})") from exc
        vg: VolumeGroup = open_powervm_vg(rest)
        return vg
    raise InvalidInput(f"VG {spec!r} is not 'file:PATH' or 'powervm:...'")
