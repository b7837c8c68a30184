"""Sparse ingest and hole-aware clones in the file VG: same bytes, fewer blocks."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from pvmcache_async.errors import InvalidInput, StorageError
from pvmcache_async.storage import fileio
from pvmcache_async.storage.fileio import HOLE_BLOCK
from pvmcache_async.storage.filevg import CloneMethod, FileVG, FileVGSettings

from ..support import holds

KiB, MiB = 1 << 10, 1 << 20


def _fs_makes_holes(directory: Path) -> bool:
    """Whether this filesystem stores a file with a hole in fewer blocks than its size."""
    probe = directory / ".hole-probe"
    with open(probe, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"x")
    try:
        return os.stat(probe).st_blocks * 512 < MiB
    finally:
        probe.unlink()


def _disks(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _image(seed: int) -> bytes:
    """Zero runs of several lengths and alignments, data between, and trailing zeros."""
    rng = random.Random(seed)
    parts = [
        rng.randbytes(100),  # data not aligned to a block
        bytes(3 * HOLE_BLOCK + 17),
        rng.randbytes(2 * HOLE_BLOCK),
        bytes(MiB),
        b"\0" * 5 + b"\1" + bytes(HOLE_BLOCK),  # a lone non-zero byte inside zeros
        rng.randbytes(HOLE_BLOCK - 1),
        bytes(2 * MiB),  # the image ends in zeros: only the final size records them
    ]
    return b"".join(parts)


async def _ingest(vg: FileVG, name: str, data: bytes, chunk: int) -> None:
    partial = await vg.create_partial("p_" + name, len(data))
    for i in range(0, len(data), chunk):
        await partial.write(data[i : i + chunk])
    await partial.publish(name)


@pytest.mark.parametrize("writeback", [True, False])
@pytest.mark.parametrize("chunk", [1000, 64 * KiB, 4 * MiB])
async def test_sparse_ingest_gives_the_same_bytes_whatever_the_chunk_sizes(
    tmp_path: Path, chunk: int, writeback: bool
) -> None:
    data = _image(1)
    vg = FileVG(tmp_path, FileVGSettings(writeback=writeback))
    await _ingest(vg, "i_img", data, chunk)
    assert (tmp_path / "i_img").read_bytes() == data


async def test_sparse_ingest_leaves_zero_runs_as_holes(tmp_path: Path) -> None:
    if not _fs_makes_holes(tmp_path):
        pytest.skip("this filesystem does not store holes")
    data = _image(2)
    await _ingest(FileVG(tmp_path), "i_sparse", data, 4 * MiB)
    await _ingest(FileVG(tmp_path, FileVGSettings(sparse=False)), "i_dense", data, 4 * MiB)
    sparse, dense = (os.stat(tmp_path / n).st_blocks * 512 for n in ("i_sparse", "i_dense"))
    assert dense >= len(data)
    assert sparse < len(data) // 2  # about 2.3 of the 6.3 MiB are data


async def test_a_partial_disk_takes_its_room_up_front_and_gives_zero_runs_back(
    tmp_path: Path,
) -> None:
    vg = FileVG(tmp_path)
    if not await vg.reserves_space() or not _fs_makes_holes(tmp_path):
        pytest.skip("this filesystem cannot reserve room (fallocate) or punch holes")
    data = _image(4)
    partial = await vg.create_partial("p_r", len(data))
    # all of it, before a byte arrived (integration/test_faults.py shows another process see it)
    assert os.stat(tmp_path / "p_r").st_blocks * 512 >= len(data)
    for i in range(0, len(data), MiB):
        await partial.write(data[i : i + MiB])
    await partial.publish("i_r")
    assert (tmp_path / "i_r").read_bytes() == data
    assert os.stat(tmp_path / "i_r").st_blocks * 512 < len(data) // 2  # the zeros went back


async def test_rewind_then_rewrite_leaves_only_the_new_bytes(tmp_path: Path) -> None:
    vg = FileVG(tmp_path)
    partial = await vg.create_partial("p_x", 0)
    await partial.write(random.Random(3).randbytes(MiB))
    await partial.rewind()
    await partial.write(bytes(MiB) + b"end")
    await partial.publish("i_x")
    assert (tmp_path / "i_x").read_bytes() == bytes(MiB) + b"end"


@pytest.mark.parametrize("writeback", [True, False])
@pytest.mark.parametrize("method", ["auto", "sparse", "copy"])
async def test_clone_is_byte_identical_to_its_source(
    tmp_path: Path, method: CloneMethod, writeback: bool
) -> None:
    # pieces smaller than the data extents, so a clone's writeback goes piece by piece
    settings = FileVGSettings(clone_method=method, writeback=writeback, writeback_piece=40 * KiB)
    data = _image(4)
    vg = FileVG(tmp_path, settings)
    await _ingest(vg, "i_src", data, 256 * KiB)
    await vg.clone("i_src", "b_dst")
    assert (tmp_path / "b_dst").read_bytes() == data
    assert _disks(tmp_path) == ["b_dst", "i_src"]


@pytest.mark.parametrize("method", ["auto", "sparse", "copy"])
async def test_a_clone_of_a_size_is_grown_by_a_hole_and_a_smaller_size_is_refused(
    tmp_path: Path, method: CloneMethod
) -> None:
    data = _image(8)
    vg = FileVG(tmp_path, FileVGSettings(clone_method=method))
    await _ingest(vg, "i_src", data, MiB)
    await vg.clone("i_src", "b_big", 1 << 30)
    with pytest.raises(InvalidInput, match="cannot hold"):
        await vg.clone("i_src", "b_small", len(data) - 1)

    assert holds(tmp_path / "b_big", data, 1 << 30)
    if _fs_makes_holes(tmp_path):
        assert os.stat(tmp_path / "b_big").st_blocks * 512 < len(data) + MiB
    assert _disks(tmp_path) == ["b_big", "i_src"]  # no half-made clone left


async def test_hole_aware_clone_keeps_the_holes(tmp_path: Path) -> None:
    if not _fs_makes_holes(tmp_path):
        pytest.skip("this filesystem does not store holes")
    data = _image(5)
    vg = FileVG(tmp_path, FileVGSettings(clone_method="sparse"))
    await _ingest(vg, "i_src", data, MiB)
    await vg.clone("i_src", "b_dst")
    src, dst = (os.stat(tmp_path / n).st_blocks for n in ("i_src", "b_dst"))
    assert dst <= src
    assert dst * 512 < len(data) // 2


async def test_forced_reflink_clones_or_fails_cleanly(tmp_path: Path) -> None:
    """Where the filesystem cannot reflink, a forced reflink is a clear error, no debris."""
    data = _image(6)
    vg = FileVG(tmp_path, FileVGSettings(clone_method="reflink"))
    await _ingest(vg, "i_src", data, MiB)
    try:
        await vg.clone("i_src", "b_dst")
    except StorageError as exc:
        assert "cannot reflink" in str(exc)
        assert _disks(tmp_path) == ["i_src"]
    else:
        assert (tmp_path / "b_dst").read_bytes() == data


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's")
def test_early_writeback_is_bound_to_the_kernel_on_linux() -> None:
    # Only the binding is checked: a started writeback leaves nothing a test can see in one
    # file (the kernel's dirty and writeback counters are the whole system's); what it buys
    # is measured in benchmarks/README.md ("no early writeback").
    assert fileio.HAVE_WRITEBACK  # else every publish would silently flush all its data


async def test_a_copy_alongside_a_download_is_offered_exactly_where_clones_are_not_reflinks(
    tmp_path: Path,
) -> None:
    data = _image(7)
    await _ingest(FileVG(tmp_path), "i_src", data, MiB)
    try:
        await FileVG(tmp_path, FileVGSettings(clone_method="reflink")).clone("i_src", "b_ref")
        reflinks = True
    except StorageError:
        reflinks = False
    vg = FileVG(tmp_path)
    copy = await vg.create_copy("b_tee", len(data))
    assert (copy is None) == reflinks
    if copy is not None:  # an owned temporary: discarded, it leaves nothing
        await copy.write(data)
        await copy.discard()
    assert _disks(tmp_path) == (["b_ref", "i_src"] if reflinks else ["i_src"])
    forced = await FileVG(tmp_path, FileVGSettings(clone_method="sparse")).create_copy("b_x", 1)
    assert forced is not None  # hole-aware copies asked for: a tee even where reflinks work
    await forced.discard()
