"""Helpers shared by the tests: image data, and a file VG whose writes can be held."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pvmcache_async.storage.base import DiskIdentity, PartialDisk
from pvmcache_async.storage.filevg import FileVG
from pvmcache_dev.storm.images import zeros_from


def disk_image(size: int, seed: int = 0) -> bytes:
    """Bytes shaped like a disk image: random blocks with long runs of zeros between."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        block = rng.choice([64 << 10, 256 << 10])
        out += rng.randbytes(block) if rng.random() < 0.6 else bytes(block)
    return bytes(out[:size])


def holds(path: Path, data: bytes, size: int) -> bool:
    """Whether disk file ``path`` is ``size`` bytes: ``data``, then zeros only."""
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size != size or f.read(len(data)) != data:
            return False
    return zeros_from(path, len(data))


def vg_files(root: Path) -> list[str]:
    """The disks of a file VG: every non-hidden regular file."""
    return sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


class PassedPartial(PartialDisk):
    """A real partial disk, every call passed through; subclasses change what they test."""

    def __init__(self, inner: PartialDisk) -> None:
        self.name = inner.name
        self._inner = inner

    async def write(self, chunk: bytes) -> None:
        await self._inner.write(chunk)

    async def rewind(self) -> None:
        await self._inner.rewind()

    async def publish(self, final_name: str, size: int | None = None) -> None:
        await self._inner.publish(final_name, size)

    async def discard(self) -> None:
        await self._inner.discard()


class GatedPartial(PassedPartial):
    """A real file-VG partial disk whose first write waits until the gate opens."""

    def __init__(self, inner: PartialDisk, vg: GatedVG) -> None:
        super().__init__(inner)
        self._vg = vg

    async def write(self, chunk: bytes) -> None:
        self._vg.writing.set()
        await self._vg.gate.wait()
        await self._inner.write(chunk)


class GatedVG(FileVG):
    """A file VG that holds every download at its first write until ``gate`` is set,
    and can report a full disk: what a test needs to act while a download is under way."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()
        self.full = False
        self.free: int | None = None  # report this many bytes free instead of the truth
        self.reserving = True  # False: act as a VG whose partial disks take room as they fill
        self.partials_created = 0

    async def reserves_space(self) -> bool:
        return self.reserving and await super().reserves_space()

    async def create_partial(
        self, name: str, size: int, *, identity: DiskIdentity | None = None
    ) -> PartialDisk:
        self.partials_created += 1
        return GatedPartial(await super().create_partial(name, size, identity=identity), self)

    async def capacity(self):  # type: ignore[no-untyped-def]
        real = await super().capacity()
        free = 0 if self.full else self.free
        return real if free is None else type(real)(total=real.total, free=free)


PLANTED = ["symlink", "fifo", "directory"]  # what a hostile operator leaves for a file


def plant(path: Path, kind: str, target: Path) -> None:
    """Leave at ``path`` what an operator or attacker would instead of a file the cache made:
    a symlink to ``target``, a FIFO or a directory (``PLANTED``)."""
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        assert kind == "directory", kind
        path.mkdir()


def write_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


# -- the command line in a process of its own -----------------------------------------------


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}


def cli_args(url: str | None, vg: Path, *args: str) -> list[str]:
    glance = ["--glance-url", url] if url else []
    return [sys.executable, "-m", "pvmcache_async", *glance, "--vg", f"file:{vg}", *args]


def run_cli(url: str | None, vg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_args(url, vg, *args), capture_output=True, text=True, env=cli_env(), timeout=120
    )


def start_cli(url: str, vg: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_args(url, vg, "--read-timeout", "120", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
