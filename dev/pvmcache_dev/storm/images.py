"""Generated raw images shaped like disk images, and reading disks back to check them."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
