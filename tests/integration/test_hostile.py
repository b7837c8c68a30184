"""What operators and attackers actually do to a VG: remove lock files under a live download,
lose or tamper with the index, plant symlinks, fill the filesystem. Each ends in correct disks
or a one-line error naming the image and the cause; never in wrong bytes under a real name, a
deleted disk the cache did not make, or a file written outside the VG.

Real Glance, real processes (the command line), real symlinks, a real full filesystem (a small
tmpfs mounted for the test).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from pvmcache_async import (
    CacheSettings,
    DeployResult,
    GlanceClient,
    ImageCache,
    InsufficientSpace,
    StorageError,
)
from pvmcache_async.names import PARTIAL_PREFIX, cache_disk_names, instance_disk_name
from pvmcache_async.storage.filevg import FileVG, FileVGSettings
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import ThreadedFaultProxy, stall
from ..support import GatedVG, cli_args, cli_env, disk_image, run_cli, start_cli, vg_files, wait_for

MiB = 1 << 20


def _ok(out: subprocess.CompletedProcess[str]) -> object:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _ls(vg: Path) -> list[dict[str, object]]:
    rows = _ok(run_cli(None, vg, "ls", "--json"))
    assert isinstance(rows, list)
    return rows


def _deploy(url: str, vg: Path, img: str, inst: str | None = None) -> dict[str, object]:
    row = _ok(run_cli(url, vg, "deploy", img, "--instance", inst or str(uuid.uuid4()), "--json"))
    assert isinstance(row, dict)
    return row


def _error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # one line, no traceback
    return lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- two writers of one image ---------------------------------------------------------------


def test_writers_whose_lock_file_was_removed_each_publish_only_bytes_they_verified(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    # A downloads and is held mid-way; an operator removes the lock directory; B then takes the
    # image's lock on a fresh file and downloads too, and is held as well. Neither may remove
    # the other's live partial, and whichever publishes second must not publish the other's.
    data = disk_image(4 * MiB, seed=90)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    partials = lambda: [n for n in vg_files(vg) if n.startswith(PARTIAL_PREFIX)]  # noqa: E731
    runner = ThreadedFaultProxy(glance_server.url)
    with runner as proxy:
        proxy.plan(img, stall(after=MiB), stall(after=2 * MiB))
        a = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()), "--json")
        wait_for("A's partial", lambda: vg.is_dir() and len(partials()) == 1)
        shutil.rmtree(vg / ".pvmcache" / "locks")
        b = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()), "--json")
        wait_for("B's partial", lambda: len(partials()) == 2 and len(proxy.file_gets(img)) == 2)
        assert len(partials()) == 2  # a partial of each writer's own, both alive
        runner.release_stalls()
        outs = [p.communicate(timeout=60) for p in (a, b)]

    assert [p.returncode for p in (a, b)] == [0, 0], outs
    rows = [json.loads(out) for out, _ in outs]
    cache_disk = rows[0]["cache_disk"]
    assert rows[1]["cache_disk"] == cache_disk
    for disk in (cache_disk, rows[0]["disk"], rows[1]["disk"]):
        assert _sha(vg / str(disk)) == hashlib.sha256(data).hexdigest(), disk
    assert sorted(vg_files(vg)) == sorted([cache_disk, rows[0]["disk"], rows[1]["disk"]])
    assert [(r["cache_disk"], r["state"]) for r in _ls(vg)] == [(cache_disk, "ready")]


# -- state that can be lost or altered ------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated", "emptied", "garbage"])
def test_a_lost_or_corrupt_index_is_rebuilt_from_the_disks(
    glance_server: GlanceServer, tmp_path: Path, damage: str
) -> None:
    data = disk_image(2 * MiB, seed=91)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    cache_disk = _deploy(glance_server.url, vg, img)["cache_disk"]
    index = vg / ".pvmcache" / "index.sqlite"
    if damage == "deleted":
        index.unlink()
    elif damage == "truncated":
        with open(index, "r+b") as f:
            f.truncate(os.path.getsize(index) // 2)
    elif damage == "emptied":
        index.write_bytes(b"")
    else:
        index.write_bytes(os.urandom(8192))

    assert [(r["image_id"], r["cache_disk"], r["state"]) for r in _ls(vg)] == [
        (img, cache_disk, "ready")
    ]
    again = _deploy(glance_server.url, vg, img)
    assert (again["result"], again["cache_disk"]) == ("hit", cache_disk)
    assert glance_server.file_requests(img) == 1  # never downloaded again under a new name
    assert _ok(run_cli(None, vg, "prune", "--min-age", "0", "--json")) == {
        "removed": [cache_disk],
        "kept": [],
    }


async def test_an_index_row_naming_an_instance_disk_never_deletes_it(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=92))
    vg = tmp_path / "vg"
    row = _deploy(glance_server.url, vg, img)
    instance_disk = vg / str(row["disk"])
    db = sqlite3.connect(vg / ".pvmcache" / "index.sqlite")
    with db:
        db.execute("UPDATE images SET cache_disk = ? WHERE image_id = ?", (row["disk"], img))
    db.close()

    pruned = _ok(run_cli(None, vg, "prune", "--min-age", "0", "--json"))

    # the altered row is dropped, the instance disk left alone; the image's own disk, which
    # the row no longer named, is entered again (checked) and so pruned, not leaked
    assert instance_disk.exists() and pruned == {"removed": [row["cache_disk"]], "kept": []}
    assert _ls(vg) == []


async def test_an_index_row_naming_a_disk_of_another_image_never_deletes_it(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    # B's cache disk moved to a name the cache could give A, and A's row pointed at it: the
    # name passes, the identity the disk records (B) does not
    a, b = (glance_server.create_image(disk_image(MiB, seed=s)) for s in (93, 94))
    vg = tmp_path / "vg"
    disk_a = str(_deploy(glance_server.url, vg, a)["cache_disk"])
    disk_b = str(_deploy(glance_server.url, vg, b)["cache_disk"])
    (vg / disk_a).unlink()
    (vg / disk_b).rename(vg / disk_a)
    db = sqlite3.connect(vg / ".pvmcache" / "index.sqlite")
    with db:
        db.execute("DELETE FROM images WHERE image_id = ?", (b,))
    db.close()

    cache = ImageCache(FileVG(vg))
    try:
        assert await cache.remove(a) is False
    finally:
        await cache.close()
    assert (vg / disk_a).exists()


# -- symlinks planted in the VG ---------------------------------------------------------------


def test_a_symlinked_lock_file_is_refused_and_nothing_is_written_through_it(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=95))
    vg, victim = tmp_path / "vg", tmp_path / "victim"
    (vg / ".pvmcache" / "locks").mkdir(parents=True)
    (vg / ".pvmcache" / "locks" / f"{img}.lock").symlink_to(victim)

    line = _error(run_cli(glance_server.url, vg, "deploy", img, "--instance", str(uuid.uuid4())))

    assert "is a symbolic link" in line and f"{img}.lock" in line
    assert not victim.exists()
    assert glance_server.file_requests(img) == 0


@pytest.mark.parametrize("state_dir", ["locks"])
def test_a_symlinked_state_directory_is_refused(
    glance_server: GlanceServer, tmp_path: Path, state_dir: str
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=96))
    vg, elsewhere = tmp_path / "vg", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (vg / ".pvmcache").mkdir(parents=True)
    (vg / ".pvmcache" / state_dir).symlink_to(elsewhere)

    for args in (["deploy", img, "--instance", str(uuid.uuid4())], ["prune", "--min-age", "0"]):
        line = _error(run_cli(glance_server.url, vg, *args))
        assert f"{state_dir} is a symbolic link" in line
    assert list(elsewhere.iterdir()) == []


def test_a_dangling_symlink_at_the_cache_disk_name_is_refused_before_any_download(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=97))
    vg = tmp_path / "vg"
    vg.mkdir()
    name = next(cache_disk_names(img))
    (vg / name).symlink_to(tmp_path / "nowhere")

    line = _error(run_cli(glance_server.url, vg, "deploy", img, "--instance", str(uuid.uuid4())))

    assert img in line and f"disk {name} is a symbolic link" in line
    assert glance_server.file_requests(img) == 0
    assert not (tmp_path / "nowhere").exists()


def test_a_symlink_at_the_instance_disk_name_is_refused_and_its_target_untouched(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=98))
    vg, target = tmp_path / "vg", tmp_path / "precious"
    vg.mkdir()
    target.write_bytes(b"not a disk")
    inst = str(uuid.uuid4())
    (vg / instance_disk_name(inst)).symlink_to(target)

    line = _error(run_cli(glance_server.url, vg, "deploy", img, "--instance", inst))

    assert img in line and "is a symbolic link" in line
    assert target.read_bytes() == b"not a disk"
    assert glance_server.file_requests(img) == 0


def test_a_symlinked_index_is_refused(tmp_path: Path) -> None:
    vg, elsewhere = tmp_path / "vg", tmp_path / "elsewhere.sqlite"
    (vg / ".pvmcache").mkdir(parents=True)
    (vg / ".pvmcache" / "index.sqlite").symlink_to(elsewhere)

    assert "not a regular file" in _error(run_cli(None, vg, "ls"))
    assert not elsewhere.exists()


# -- disks are private -------------------------------------------------------------------------


@pytest.mark.parametrize("tee", [True, False])
async def test_disks_are_readable_by_their_owner_only(
    glance_server: GlanceServer, tmp_path: Path, tee: bool
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=99))
    vg = FileVG(tmp_path / "vg", FileVGSettings(clone_method="sparse"))
    cache = ImageCache(vg, GlanceClient(glance_server.url), CacheSettings(tee=tee))
    old = os.umask(0)
    try:
        first = await cache.deploy(img, str(uuid.uuid4()))
        second = await cache.deploy(img, str(uuid.uuid4()))
    finally:
        os.umask(old)
        await cache.close()
    for disk in (first.cache_disk, first.disk, second.disk):
        assert (tmp_path / "vg" / disk).stat().st_mode & 0o777 == 0o600, disk


async def test_the_disk_mode_is_the_file_vgs_setting(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=100))
    cache = ImageCache(
        FileVG(tmp_path / "vg", FileVGSettings(mode=0o640)), GlanceClient(glance_server.url)
    )
    try:
        deployed = await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()
    for disk in (deployed.cache_disk, deployed.disk):
        assert (tmp_path / "vg" / disk).stat().st_mode & 0o777 == 0o640, disk


# -- the command line's VG path --------------------------------------------------------------


@pytest.mark.parametrize("command", [["ls"], ["prune", "--min-age", "0"]])
def test_looking_at_a_mistyped_vg_path_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    vg = tmp_path / "no" / "such" / "vg"

    line = _error(run_cli(None, vg, *command))

    assert str(vg) in line and "no such directory" in line
    assert not (tmp_path / "no").exists()


# -- a tight prune loop beside deploys ------------------------------------------------------


def test_a_tight_prune_loop_never_fails_a_deploy(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=101)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    vg.mkdir()
    stop = tmp_path / "stop"
    loop = subprocess.Popen(
        ["sh", "-c", f'while [ ! -e "{stop}" ]; do "$@" >/dev/null || exit 1; done', "sh",
         *cli_args(None, vg, "prune", "--min-age", "0")],
        env=cli_env(),
    )  # fmt: skip
    try:
        rows = [_deploy(glance_server.url, vg, img) for _ in range(8)]
    finally:
        stop.touch()
        assert loop.wait(timeout=60) == 0
    for r in rows:
        assert _sha(vg / str(r["disk"])) == hashlib.sha256(data).hexdigest()
        # a deploy that downloaded says so, with the bytes it fetched
        assert (r["result"], r["bytes_fetched"]) in (("miss", len(data)), ("hit", 0))
    assert glance_server.file_requests(img) == sum(r["result"] == "miss" for r in rows)


class _HookedVG(FileVG):
    """A file VG that runs ``hook`` once, when disk ``name`` is looked up the ``nth`` time."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.name = ""
        self.nth = 0
        self.hook: Callable[[], Awaitable[None]] | None = None

    async def disk_size(self, name: str) -> int | None:
        if name == self.name and self.hook is not None:
            self.nth -= 1
            if self.nth == 0:
                hook, self.hook = self.hook, None
                await hook()
        return await super().disk_size(name)


async def _deploy_with_hook(
    glance_server: GlanceServer,
    root: Path,
    data: bytes,
    nth: int,
    hook: Callable[[str], Awaitable[None]],
) -> DeployResult:
    """Cache the image, then deploy it with ``hook(cache_disk)`` run at the ``nth`` look at
    its cache disk during the deploy."""
    img = glance_server.create_image(data)
    vg = _HookedVG(root)
    cache = ImageCache(vg, GlanceClient(glance_server.url))
    try:
        cache_disk = (await cache.ensure(img)).cache_disk
        vg.name, vg.nth, vg.hook = cache_disk, nth, lambda: hook(cache_disk)
        return await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()


async def test_a_removal_cannot_take_the_cache_disk_from_a_deploy_under_way(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=102)
    pruner = ImageCache(FileVG(tmp_path / "vg"))  # its own lock files, as another process
    removed: list[bool] = []

    async def remove(cache_disk: str) -> None:  # between the deploy's look and its clone
        [entry] = await pruner.entries()
        removed.append(await pruner.remove(entry.image_id))

    try:
        deployed = await _deploy_with_hook(glance_server, tmp_path / "vg", data, 1, remove)
    finally:
        await pruner.close()

    assert removed == [False]
    assert (deployed.outcome.value, deployed.bytes_fetched) == ("hit", 0)
    assert (tmp_path / "vg" / deployed.disk).read_bytes() == data


async def test_a_deploy_that_downloads_again_after_its_cache_disk_vanished_says_so(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=103)

    async def rm(cache_disk: str) -> None:  # an operator's rm, after the deploy found it cached
        (tmp_path / "vg" / cache_disk).unlink()

    deployed = await _deploy_with_hook(glance_server, tmp_path / "vg", data, 2, rm)

    assert (deployed.outcome.value, deployed.bytes_fetched) == ("miss", len(data))
    assert glance_server.file_requests(deployed.image_id) == 2
    assert (tmp_path / "vg" / deployed.disk).read_bytes() == data


# -- a full volume group ----------------------------------------------------------------------


@pytest.fixture
def small_vg(tmp_path: Path) -> Iterator[Path]:
    """A file VG on a 12 MiB tmpfs of its own, so that a test can fill it to the last byte."""
    vg = tmp_path / "vg"
    vg.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,mode=0755", "tmpfs", str(vg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full VG here: {mounted.stderr.strip()}")
    try:
        yield vg
    finally:
        subprocess.run(["umount", "-l", str(vg)], check=False)


def _fill(vg: Path, leave: int = 0) -> Path:
    """Fill the VG's filesystem with a hidden file (not a disk) until ``leave`` bytes are free."""
    filler = vg / ".filler"
    st = os.statvfs(vg)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"\1" * (st.f_bavail * st.f_frsize - leave))
        while not leave:  # what statvfs counted may be a little off: to the last block
            os.write(fd, b"\1" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(vg).f_bavail * os.statvfs(vg).f_frsize == leave
    return filler


def test_a_full_vg_can_still_be_listed_and_pruned(
    glance_server: GlanceServer, small_vg: Path
) -> None:
    data = os.urandom(2 * MiB)  # no zero runs: every byte takes room
    img, other = glance_server.create_image(data), glance_server.create_image(os.urandom(MiB))
    row = _deploy(glance_server.url, small_vg, img)
    _fill(small_vg)

    assert [r["cache_disk"] for r in _ls(small_vg)] == [row["cache_disk"]]
    line = _error(run_cli(glance_server.url, small_vg, "deploy", other, "--instance",
                          str(uuid.uuid4())))  # fmt: skip
    assert other in line and "no space left in the volume group" in line
    assert _ok(run_cli(None, small_vg, "prune", "--min-age", "0", "--json")) == {
        "removed": [row["cache_disk"]],
        "kept": [],
    }
    assert _ls(small_vg) == []
    assert vg_files(small_vg) == [row["disk"]]  # the instance disk stays


class _FillingVG(FileVG):
    """A file VG whose filesystem is filled to the last block right after each clone."""

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        await super().clone(source, target, size)
        _fill(self.root)


async def test_a_clone_whose_use_cannot_be_recorded_leaves_no_disk(
    glance_server: GlanceServer, small_vg: Path
) -> None:
    data = os.urandom(2 * MiB)
    img = glance_server.create_image(data)
    inst = str(uuid.uuid4())
    cache = ImageCache(_FillingVG(small_vg), GlanceClient(glance_server.url))
    try:
        await cache.ensure(img)
        with pytest.raises(InsufficientSpace) as failed:  # the clone fitted, its record did not
            await cache.deploy(img, inst)
        assert f"image {img}: cache index" in str(failed.value)
        assert "no space left" in str(failed.value)
        assert instance_disk_name(inst) not in vg_files(small_vg)
    finally:
        await cache.close()
    (small_vg / ".filler").unlink()
    again = _deploy(glance_server.url, small_vg, img, inst)  # the same instance, at once
    assert again["disk"] == instance_disk_name(inst)
    assert _sha(small_vg / instance_disk_name(inst)) == hashlib.sha256(data).hexdigest()


def test_a_clone_that_does_not_fit_names_the_image_and_leaves_no_disk(
    glance_server: GlanceServer, small_vg: Path
) -> None:
    data = os.urandom(2 * MiB)
    img = glance_server.create_image(data)
    _deploy(glance_server.url, small_vg, img)
    _fill(small_vg, leave=MiB)  # room for the index, not for the clone
    inst = str(uuid.uuid4())

    line = _error(run_cli(glance_server.url, small_vg, "deploy", img, "--instance", inst))

    assert img in line and "cloning" in line and "no space left" in line
    assert [n for n in vg_files(small_vg) if not n.startswith("i_")] == [_deploy_disk(small_vg)]


def _deploy_disk(vg: Path) -> str:
    """The one instance disk a test's first deploy made."""
    [disk] = [n for n in vg_files(vg) if n.startswith("b_")]
    return disk


# -- an interrupted deploy ----------------------------------------------------------------------


@pytest.mark.parametrize("tee", [True, False])
async def test_an_interrupted_deploy_leaves_nothing_and_the_instance_deploys_again_at_once(
    glance_server: GlanceServer, tmp_path: Path, tee: bool
) -> None:
    # what the command line does on SIGINT/SIGTERM: cancel the deploy, then close the cache
    data = disk_image(3 * MiB, seed=104)
    img = glance_server.create_image(data)
    root, inst = tmp_path / "vg", str(uuid.uuid4())
    runner = ThreadedFaultProxy(glance_server.url)
    with runner as proxy:
        proxy.plan(img, stall(after=MiB))
        cache = ImageCache(FileVG(root), GlanceClient(proxy.url), CacheSettings(tee=tee))
        try:
            deploy = asyncio.create_task(cache.deploy(img, inst))
            for _ in range(3000):  # the download is under way
                if proxy.stalled.is_set() and vg_files(root):
                    break
                await asyncio.sleep(0.01)
            deploy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await deploy
        finally:
            await cache.close()
            runner.release_stalls()
    assert vg_files(root) == []
    assert list((root / ".pvmcache" / "locks").iterdir()) == []

    cache = ImageCache(FileVG(root), GlanceClient(glance_server.url))
    try:
        again = await cache.deploy(img, inst)
        assert [e.state.value for e in await cache.entries()] == ["ready"]
    finally:
        await cache.close()
    assert (again.outcome.value, again.disk) == ("miss", instance_disk_name(inst))
    assert (root / again.disk).read_bytes() == data


async def test_a_partial_removed_under_its_writer_is_not_published(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(2 * MiB, seed=105))
    root = tmp_path / "vg"
    vg = GatedVG(root)
    cache = ImageCache(vg, GlanceClient(glance_server.url), CacheSettings(tee=False))
    try:
        ensure = asyncio.create_task(cache.ensure(img))
        await vg.writing.wait()
        [partial] = vg_files(root)
        (root / partial).unlink()  # an operator's rm
        (root / partial).write_bytes(b"planted")  # and something else under its name
        vg.gate.set()
        with pytest.raises(StorageError, match=f"image {img}: {partial} was removed while"):
            await ensure
    finally:
        await cache.close()
    assert vg_files(root) == [partial]  # the planted file, never published nor removed
    assert (root / partial).read_bytes() == b"planted"
