"""The memory VG keeps the volume group contract of storage/base.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pvmcache_async.errors import DiskExists, InsufficientSpace, InvalidInput, StorageError
from pvmcache_async.storage import Capacity, DiskIdentity, DiskInfo
from pvmcache_async.storage.memory import MemoryVG

ID = DiskIdentity("3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00", 6, "sha256", "ab" * 32)


async def test_a_published_partial_appears_under_its_name_with_exactly_its_bytes(
    vg: MemoryVG,
) -> None:
    partial = await vg.create_partial("p_one", 6)
    await partial.write(b"abc")
    await partial.write(b"def")
    await partial.publish("i_one")
    assert vg.read("i_one") == b"abcdef"
    assert await vg.disk_size("i_one") == 6
    assert await vg.disk_size("p_one") is None  # the partial is gone


async def test_a_partial_is_not_visible_under_its_final_name_before_publish(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 6)
    await partial.write(b"abcdef")
    assert await vg.disk_size("i_one") is None
    assert [d.name for d in await vg.list_disks()] == ["p_one"]


async def test_publish_never_replaces_a_disk_and_the_partial_can_still_be_discarded(
    vg: MemoryVG,
) -> None:
    first = await vg.create_partial("p_one", 3)
    await first.write(b"old")
    await first.publish("i_one")
    second = await vg.create_partial("p_two", 3)
    await second.write(b"new")
    with pytest.raises(DiskExists, match="i_one"):
        await second.publish("i_one")
    assert vg.read("i_one") == b"old"
    await second.discard()
    assert [d.name for d in await vg.list_disks()] == ["i_one"]


async def test_a_clone_is_a_full_copy_under_a_new_name(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 4)
    await partial.write(b"data")
    await partial.publish("i_one")
    await vg.clone("i_one", "b_one")
    assert vg.read("b_one") == b"data"
    assert vg.read("i_one") == b"data"


async def test_a_clone_never_replaces_its_target(vg: MemoryVG) -> None:
    for name, data in (("i_one", b"src"), ("b_one", b"dst")):
        partial = await vg.create_partial("p_" + name[2:], 3)
        await partial.write(data)
        await partial.publish(name)
    with pytest.raises(DiskExists, match="b_one"):
        await vg.clone("i_one", "b_one")
    assert vg.read("b_one") == b"dst"


async def test_a_clone_of_a_missing_disk_is_a_storage_error_and_makes_nothing(
    vg: MemoryVG,
) -> None:
    with pytest.raises(StorageError, match="i_gone"):
        await vg.clone("i_gone", "b_one")
    assert await vg.list_disks() == []


async def test_deleting_a_missing_disk_is_not_an_error(vg: MemoryVG) -> None:
    await vg.delete("i_gone")
    assert await vg.list_disks() == []


async def test_a_published_cache_disk_carries_its_identity_and_its_clone_none(
    vg: MemoryVG,
) -> None:
    partial = await vg.create_partial("p_one", 6, identity=ID)
    await partial.write(b"abcdef")
    assert await vg.disk_identity("p_one") is None  # recorded on publish, not before
    await partial.publish("i_one")
    await vg.clone("i_one", "b_one")
    assert await vg.disk_identity("i_one") == ID
    assert await vg.disk_identity("b_one") is None
    assert await vg.disk_identity("i_gone") is None


async def test_rewind_drops_everything_written(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 3)
    await partial.write(b"xyz")
    await partial.rewind()
    await partial.write(b"abc")
    await partial.publish("i_one")
    assert vg.read("i_one") == b"abc"


async def test_discard_removes_the_partial_and_is_idempotent(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 3)
    await partial.write(b"xyz")
    await partial.discard()
    await partial.discard()
    assert await vg.list_disks() == []


async def test_a_closed_partial_refuses_writes_and_a_second_publish(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 3)
    await partial.write(b"xyz")
    await partial.publish("i_one")
    with pytest.raises(StorageError, match="already closed"):
        await partial.write(b"more")
    with pytest.raises(StorageError, match="already closed"):
        await partial.publish("i_two")
    assert vg.read("i_one") == b"xyz"


async def test_a_partial_deleted_while_it_was_written_is_not_published(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 3)
    await partial.write(b"xyz")
    await vg.delete("p_one")  # an operator's rm
    with pytest.raises(StorageError, match="removed while it was written"):
        await partial.publish("i_one")
    assert await vg.list_disks() == []


async def test_a_partial_never_publishes_a_disk_planted_under_its_name(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 3)
    await partial.write(b"own")
    await vg.delete("p_one")
    planted = await vg.create_partial("p_one", 3)  # another writer takes the free name
    await planted.write(b"bad")
    with pytest.raises(StorageError, match="removed while it was written"):
        await partial.publish("i_one")
    assert await vg.disk_size("i_one") is None
    await planted.discard()


async def test_a_taken_temporary_name_is_refused(vg: MemoryVG) -> None:
    await vg.create_partial("p_one", 3)
    with pytest.raises(DiskExists, match="p_one"):
        await vg.create_partial("p_one", 3)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 16, "i-one", "i one"])
async def test_a_disk_name_powervm_would_refuse_is_refused(vg: MemoryVG, name: str) -> None:
    with pytest.raises(InvalidInput, match="disk name"):
        await vg.create_partial(name, 3)
    with pytest.raises(InvalidInput, match="disk name"):
        await vg.disk_size(name)


async def test_a_dead_writers_partial_is_removed_and_a_live_ones_is_kept(vg: MemoryVG) -> None:
    dead = await vg.create_partial("p_dead", 3)
    await dead.write(b"xyz")
    live = await vg.create_partial("p_live", 3)
    dead.abandon()
    assert await vg.remove_dead_temporaries() == ["p_dead"]
    assert [d.name for d in await vg.list_disks()] == ["p_live"]
    await live.write(b"abc")
    await live.publish("i_live")
    assert vg.read("i_live") == b"abc"


async def test_a_dead_writer_can_do_nothing_more(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_dead", 3)
    partial.abandon()
    with pytest.raises(StorageError, match="writer is gone"):
        await partial.write(b"x")
    with pytest.raises(StorageError, match="writer is gone"):
        await partial.publish("i_one")
    await partial.discard()  # does nothing: the sweep finds the disk
    assert [d.name for d in await vg.list_disks()] == ["p_dead"]


async def test_published_disks_are_never_dead_temporaries(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 3)
    await partial.write(b"xyz")
    await partial.publish("i_one")
    partial.abandon()  # its writer dies after publishing
    assert await vg.remove_dead_temporaries() == []
    assert vg.read("i_one") == b"xyz"


async def test_a_reserving_vg_takes_a_partials_room_up_front(tmp_path: Path) -> None:
    vg = MemoryVG(tmp_path / "state", total=10)
    await vg.create_partial("p_one", 6)
    assert (await vg.capacity()).free == 4
    with pytest.raises(InsufficientSpace, match="4 bytes free"):
        await vg.create_partial("p_two", 6)
    assert [d.name for d in await vg.list_disks()] == ["p_one"]


async def test_a_vg_that_does_not_reserve_runs_out_of_room_mid_write(tmp_path: Path) -> None:
    vg = MemoryVG(tmp_path / "state", total=10, reserves=False)
    assert not await vg.reserves_space()
    partial = await vg.create_partial("p_one", 20)  # room is taken as data arrives
    await partial.write(b"x" * 8)
    with pytest.raises(InsufficientSpace, match="p_one"):
        await partial.write(b"x" * 8)
    assert (await vg.capacity()).free == 2


async def test_the_free_space_counts_every_disk(tmp_path: Path) -> None:
    vg = MemoryVG(tmp_path / "state", total=100)
    partial = await vg.create_partial("p_one", 10)
    await partial.write(b"x" * 10)
    await partial.publish("i_one")
    await vg.clone("i_one", "b_one")
    assert await vg.capacity() == Capacity(total=100, free=80)


async def test_a_copy_for_a_deploy_publishes_as_its_target(vg: MemoryVG) -> None:
    copy = await vg.create_copy("b_one", 3)
    assert copy is not None and copy.name.startswith("t_")
    await copy.write(b"abc")
    await copy.publish("b_one")
    assert vg.read("b_one") == b"abc"
    assert await vg.disk_identity("b_one") is None


async def test_a_copy_for_a_taken_target_is_refused_at_once(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 1)
    await partial.write(b"x")
    await partial.publish("b_one")
    with pytest.raises(DiskExists, match="b_one"):
        await vg.create_copy("b_one", 3)


async def test_a_vg_without_copies_offers_none(tmp_path: Path) -> None:
    vg = MemoryVG(tmp_path / "state", copies=False)
    assert await vg.create_copy("b_one", 3) is None
    assert await vg.list_disks() == []


async def test_disks_are_listed_by_name_with_their_sizes(vg: MemoryVG) -> None:
    for name, data in (("i_b", b"12345"), ("i_a", b"12")):
        partial = await vg.create_partial("p_" + name[2:], len(data))
        await partial.write(data)
        await partial.publish(name)
    assert await vg.list_disks() == [DiskInfo("i_a", 2), DiskInfo("i_b", 5)]


async def test_a_disks_digest_is_read_back_from_its_bytes(vg: MemoryVG) -> None:
    partial = await vg.create_partial("p_one", 6)
    await partial.write(b"abcdef")
    await partial.publish("i_one")
    assert await vg.disk_digest("i_one", "sha256") == hashlib.sha256(b"abcdef").hexdigest()
    assert await vg.disk_digest("i_none", "sha256") is None
