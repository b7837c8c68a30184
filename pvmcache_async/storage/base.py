"""The volume group protocol: the few operations the cache needs from a VG backend.

A backend implements :class:`VolumeGroup` and :class:`PartialDisk`. The core only ever talks
to these two classes, and obtains a backend through :func:`pvmcache_async.storage.open_vg`.

Contract shared by every backend:

* A disk is visible under a name only once it is complete: ``PartialDisk.publish`` and
  ``VolumeGroup.clone`` make the target name appear atomically, never half-written.
* Neither ever replaces an existing disk: a taken target name raises ``DiskExists``.
* Publishing makes visible exactly the disk its own writer filled: temporary names are fresh
  per writer, and a partial disk whose name now holds another disk is not published.
* A published cache disk carries its identity (``DiskIdentity``) with it, so that the cache
  can tell its own disks and rebuild a lost index from the VG alone.
* Temporary disks (partials, clones and copies being made) are owned by their writer from
  before they can be seen until they are published or gone. Ownership rests on something
  the writer holds that no ``rm`` under the state directory can take away, and that the
  kernel drops when the writer dies (the file VG: an exclusive ``flock`` on the temporary's
  own open file; a backend without a local file: an owner lock held, ``locks.OwnerLocks``).
  ``remove_dead_temporaries`` removes a dead writer's, proven dead by taking that hold
  itself; a live writer's is never touched, whatever state files are missing.
* What a sweep cannot trust (a symlink, a FIFO or a directory under a temporary's name or
  among the state files) is skipped with one warning naming it; it never fails the sweep.
* Blocking work (system calls, REST calls) runs off the event loop thread.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DiskInfo:
    name: str
    size: int  # bytes


@dataclass(frozen=True, slots=True)
class DiskIdentity:
    """What a cache disk records of its image, with the disk itself (not only in the index)."""

    image_id: str
    size: int  # bytes
    digest_algo: str = ""  # "" where the backend cannot record it
    digest: str = ""


@dataclass(frozen=True, slots=True)
class Capacity:
    total: int  # bytes
    free: int  # bytes


class Sink(Protocol):
    """Where ``download`` puts the bytes (a ``storage.PartialDisk`` is one)."""

    async def write(self, chunk: bytes) -> None: ...

    async def rewind(self) -> None: ...


class PartialDisk(abc.ABC):
    """A disk being filled under a temporary name; sequential writes only."""

    name: str

    @abc.abstractmethod
    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``. Applies backpressure: returns when the backend took it."""
        raise NotImplementedError

    @abc.abstractmethod
    async def rewind(self) -> None:
        """Drop everything written so far and start again at byte 0."""
        raise NotImplementedError

    @abc.abstractmethod
    async def publish(self, final_name: str, size: int | None = None) -> None:
        """Make the data durable, then visible under ``final_name``; the partial is gone.

        ``size``: the published disk's size in bytes, at least the bytes written, which it
        begins with; zeros follow them (a root disk larger than its image). None: as written.
        """
        raise NotImplementedError

    @abc.abstractmethod
    async def discard(self) -> None:
        """Remove the partial disk. Idempotent; safe after a failed write or publish."""
        raise NotImplementedError


class VolumeGroup(abc.ABC):
    """A volume group: a flat namespace of disks."""

    spec: str  # how it was opened, e.g. "file:/var/lib/pvmcache/vg"
    state_dir: Path  # a local directory for the index and the lock files of this VG

    @abc.abstractmethod
    async def list_disks(self) -> list[DiskInfo]:
        raise NotImplementedError

    @abc.abstractmethod
    async def disk_size(self, name: str) -> int | None:
        """The size of disk ``name`` in bytes, or None when there is no such disk."""
        raise NotImplementedError

    @abc.abstractmethod
    async def create_partial(
        self, name: str, size: int, *, identity: DiskIdentity | None = None
    ) -> PartialDisk:
        """Start a new disk of ``size`` bytes under the temporary ``name`` (must be free),
        owned by the caller until it is published or discarded (see the module docstring).

        ``identity``: recorded with the disk when it is published (a cache disk)."""
        raise NotImplementedError

    async def disk_identity(self, name: str) -> DiskIdentity | None:
        """The identity recorded with disk ``name`` when it was published, or None (no such
        disk, or none recorded: a disk the cache did not publish, or an older one)."""
        return None

    async def disk_digest(self, name: str, algo: str) -> str | None:
        """The hex digest (``algo``, a hashlib name) of disk ``name``'s bytes as read back from
        the VG, or None where the backend cannot read its disks back (the default). A full
        read: the cache calls it only to admit a disk into its index again (a rebuild)."""
        return None

    async def create_copy(self, target: str, size: int) -> PartialDisk | None:
        """A disk for ``target`` to fill alongside a download of ``size`` bytes, or None.

        The cache writes the first deploy's disk with the same bytes as the cache disk while
        they stream in (a tee), so that deploy needs no clone afterwards. The partial lives
        under a temporary name that ``remove_dead_temporaries`` clears after a crash; its
        ``publish(target)`` is the deploy's. None (the default) where a clone after the
        download costs less than writing the data twice: a server-side or copy-on-write copy.
        """
        return None

    async def reserves_space(self) -> bool:
        """Whether a partial disk takes its whole size from the free space as it is made.

        Then the free space already leaves out every download under way, in any process, and
        ``create_partial`` refuses when there is no room. False (the default): room is taken
        as data arrives, and the cache counts its own downloads against the free space."""
        return False

    @abc.abstractmethod
    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        """Create disk ``target`` as a full copy of ``source``; atomic, never replaces.

        ``size``: the new disk's size in bytes, at least the source's; zeros follow the
        source's bytes (a root disk larger than its image). None: the source's size.
        """
        raise NotImplementedError

    @abc.abstractmethod
    async def delete(self, name: str) -> None:
        """Remove disk ``name``. A missing disk is not an error."""
        raise NotImplementedError

    @abc.abstractmethod
    async def capacity(self) -> Capacity:
        raise NotImplementedError

    async def remove_dead_temporaries(self) -> list[str]:
        """Remove temporary disks (partial downloads, half-made clones) whose writer died;
        return their names.

        Must never touch a temporary disk that a live process, this one included, still
        uses; skips, with a warning, what it cannot trust (see the module docstring). The
        default has none to remove.
        """
        return []

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release what the backend holds (sessions, threads)."""
