"""Generated raw images shaped like disk images, and reading disks back to check them."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

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
