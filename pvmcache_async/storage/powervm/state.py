"""What the PowerVM backend knows of a VG: its disks as plain values, its limits, its records."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvmcache_async.core.statefiles import read_json
from pvmcache_async.storage.base import Capacity

with warnings.catch_warnings():  # pypowervm pulls in eventlet, which warns on stderr at import
    warnings.simplefilter("ignore")
    from pypowervm import const as pvm_const
    from pypowervm import exceptions as pvm_exc


GB = 1 << 30  # pypowervm's sizes are in GB (GiB: util.convert_bytes_to_gb divides by 1024**3)
MAX_UPLOADS = 3  # pypowervm's own cap (tasks.storage._UPLOAD_SEM); more would only queue
RENAME_TRIES = 10
HTTP_BAD_REQUEST = 400  # not in pypowervm's const.HTTPStatus
ETAG_MISMATCH: int = pvm_const.HTTPStatus.ETAG_MISMATCH  # 412
# pypowervm's process-wide lock of VG updates (tasks.storage._LOCK_VOL_GRP): crt_vdisk and
# rm_vg_storage hold it; oslo's internal lock of one name is one lock in the process
VOL_GRP_LOCK = "vol_grp_lock"
VG_LOCK_FILE = "vg.lock"  # in the state directory: the VG's changes across processes
VG_BINDING = "vg.json"  # in the state directory: the one VG (by uuid) it belongs to
# a temporary disk without an owner file is another state directory's or host's writer's, or
# nobody's: it is removed only once it has been seen for this long (a day outlasts uploads)
STRAY_AGE = 86400.0
TIMED_OUT = 2 * 3600.0  # a copy the client timed out on (after 60 min) is removed after this


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a pypowervm error, if it has one."""
    status = getattr(getattr(exc, "response", None), "status", None)
    return status if isinstance(exc, pvm_exc.HttpError) and isinstance(status, int) else None


def is_etag_mismatch(exc: BaseException) -> bool:
    return http_status(exc) == ETAG_MISMATCH


RECORD_CAP = 4096  # bytes: the state records here are a few fields each


def read_record(directory: Path, name: str, what: str) -> dict[str, Any] | None:
    """A record of this state directory, read as every state file is (``statefiles``)."""
    return read_json(directory, f"{name}.json", dict, what=what, cap=RECORD_CAP)


def seen_at(record: dict[str, Any]) -> float:
    """A record's ``seen`` time, 0 where it is not a finite number (so it counts as old)."""
    seen = record.get("seen")
    if isinstance(seen, bool) or not isinstance(seen, int | float) or not math.isfinite(seen):
        return 0.0
    return float(seen)


@dataclass(frozen=True, slots=True)
class Target:
    adapter: Any
    vios_uuid: str
    vg_uuid: str


@dataclass(frozen=True, slots=True)
class VDiskState:
    """One virtual disk as a read of the VG found it, as plain values."""

    name: str
    udid: str | None
    capacity_gb: float
    file_format: str | None
    label: str | None = None

    @classmethod
    def of(cls, vdisk: Any) -> VDiskState:
        # VDisk.bld writes str(None), "None", as the label of a disk made without one
        label = vdisk.label if vdisk.label not in (None, "", "None") else None
        return cls(disk_name(vdisk), vdisk.udid, vdisk.capacity or 0.0, vdisk.file_format, label)


def disk_name(vdisk: Any) -> str:
    # a VDisk's name can come back as /path/to/name (see pypowervm's crt_vdisk)
    return (vdisk.name or "").split("/")[-1]


@dataclass(frozen=True, slots=True)
class VGState:
    """The VG as one GET found it (its disks, its capacity), as plain values made in the worker
    thread: every caller that shares the GET gets this, never pypowervm's wrapper."""

    disks: tuple[VDiskState, ...]
    capacity: Capacity

    @classmethod
    def of(cls, vg_w: Any) -> VGState:
        known = [v for v in (vg_w.available_size, vg_w.free_space) if v is not None]
        free_gb = min(known) if known else 0.0
        # disks are made in whole GB: only whole free GB can hold an image
        capacity = Capacity(total=int((vg_w.capacity or 0.0) * GB), free=math.floor(free_gb) * GB)
        return cls(tuple(VDiskState.of(d) for d in vg_w.virtual_disks), capacity)
