"""Generated raw images shaped like disk images, and reading disks back to check them."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..glance import GlanceServer

_BLOCK = 1 << 20


def make_image_file(path: Path, size: int, seed: int) -> str:
    """Write a disk-like raw image (1 MiB blocks, half random, half zeros); return its sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(_BLOCK, left)
            block = rng.randbytes(n) if rng.random() < 0.5 else bytes(n)
            f.write(block)
            digest.update(block)
            left -= n
    return digest.hexdigest()


def sha256_file(path: Path, size: int | None = None) -> str:
    """The sha256 of the file, or of its first ``size`` bytes (an image inside a root disk)."""
    with open(path, "rb") as f:
        if size is None:
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()
        while size > 0 and (block := f.read(min(_BLOCK, size))):
            digest.update(block)
            size -= len(block)
        return digest.hexdigest()


def zeros_from(path: Path, offset: int) -> bool:
    """Whether the file holds only zeros from ``offset`` to its end (a root disk after its
    image). Reads only the data extents (SEEK_DATA/SEEK_HOLE): a sparse 10 GB disk is checked
    in a moment."""
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, offset
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole from here to the end
                return True
            stop = min(end, os.lseek(fd, pos, os.SEEK_HOLE))
            f.seek(pos)
            while pos < stop:
                block = f.read(min(_BLOCK, stop - pos))
                if block.count(0) != len(block):
                    return False
                pos += len(block)
    return True


def upload_images(
    glance: GlanceServer, count: int, size: int, seed: int, scratch: Path, name: str = "storm"
) -> dict[str, str]:
    """``count`` generated images (seeds ``seed``, ``seed + 1``...) uploaded to Glance, each
    written to ``scratch`` first and removed after: image id -> sha256 of its bytes."""
    images: dict[str, str] = {}
    for n in range(count):
        path = scratch / f"{name}-image{n}.raw"
        sha = make_image_file(path, size, seed + n)
        images[glance.create_image(path, name=f"{name}-{n}")] = sha
        path.unlink()
    return images
