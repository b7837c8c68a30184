"""Who owns a temporary disk, and what a sweep may remove (issue 15, items 6 and 10).

A file VG temporary (``p_`` download, ``t_`` clone or tee copy) is owned by the writer's own
open file and its exclusive ``flock`` on it: an ``rm`` of a state directory cannot take that
away, so a live writer never loses its temporary to another process's sweep, and a dead one's
(SIGKILL) is removed by the next. A planted symlink, FIFO or directory among the state files
is skipped with one warning naming it; the rest is pruned.

Real Glance, real processes (the command line), real files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from pvmcache_async.names import CLONE_PREFIX, PARTIAL_PREFIX, is_temporary_name
from pvmcache_async.storage.fileio import HOLE_BLOCK
from pvmcache_async.storage.filevg import FileVG, probe_reflink
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import ThreadedFaultProxy, stall
from ..support import PLANTED, disk_image, plant, run_cli, start_cli, vg_files, wait_for

MiB = 1 << 20


def _temporaries(vg: Path) -> list[str]:
    return [n for n in vg_files(vg) if is_temporary_name(n)] if vg.is_dir() else []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- item 6: a live writer never loses its temporary disk ----------------------------------


@pytest.mark.parametrize(
    ("removed", "second"),
    [
        ("owners", ["prune", "--min-age", "0"]),
        ("", ["deploy", "OTHER", "--instance", "SECOND"]),  # all of .pvmcache
    ],
)
def test_a_live_download_keeps_its_temporaries_when_state_directories_are_removed(
    glance_server: GlanceServer, tmp_path: Path, removed: str, second: list[str]
) -> None:
    # A deploys and is held mid-download (its p_ partial and its tee copy t_ exist); an
    # operator removes a state directory; a second process sweeps what it takes for dead
    # writers' leftovers (a prune; the first deploy of a process). A must still finish.
    data = disk_image(4 * MiB, seed=150)
    img = glance_server.create_image(data)
    other = glance_server.create_image(disk_image(MiB, seed=151))
    vg = tmp_path / "vg"
    runner = ThreadedFaultProxy(glance_server.url)
    with runner as proxy:
        proxy.plan(img, stall(after=MiB))
        a = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()), "--json")
        wait_for("A's partial", lambda: proxy.stalled.is_set() and bool(_temporaries(vg)))
        held = _temporaries(vg)
        (vg / ".pvmcache" / "owners").mkdir(exist_ok=True)  # an older version's, if absent
        shutil.rmtree(vg / ".pvmcache" / removed)
        args = [{"OTHER": other, "SECOND": str(uuid.uuid4())}.get(w, w) for w in second]
        swept = run_cli(glance_server.url, vg, *args)

        assert swept.returncode == 0, swept.stderr
        assert set(held) <= set(_temporaries(vg)) and a.poll() is None  # A's left alone
        runner.release_stalls()
        out, err = a.communicate(timeout=60)

    assert a.returncode == 0, err
    row = json.loads(out)
    assert row["result"] == "miss"
    for disk in (row["cache_disk"], row["disk"]):
        assert _sha(vg / str(disk)) == hashlib.sha256(data).hexdigest(), disk
    assert _temporaries(vg) == []
    # the download's partial, and its tee copy where clones are not reflinks
    prefixes = sorted(n[:2] for n in held)
    assert prefixes == ([PARTIAL_PREFIX] if probe_reflink(vg) else [PARTIAL_PREFIX, CLONE_PREFIX])


def test_a_killed_download_is_swept_even_after_its_state_directory_was_removed(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(4 * MiB, seed=152))
    vg = tmp_path / "vg"
    with ThreadedFaultProxy(glance_server.url) as proxy:
        proxy.plan(img, stall(after=MiB))
        victim = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()))
        wait_for("the stall", lambda: proxy.stalled.is_set() and bool(_temporaries(vg)))
        shutil.rmtree(vg / ".pvmcache")
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
    assert _temporaries(vg)  # what the SIGKILL left

    out = run_cli(None, vg, "prune", "--min-age", "0", "--json")

    assert out.returncode == 0, out.stderr
    assert vg_files(vg) == []


# -- item 10: one bad state file never fails a prune ---------------------------------------


@pytest.mark.parametrize("kind", PLANTED)
def test_a_planted_state_file_is_skipped_with_a_warning_and_the_rest_is_pruned(
    glance_server: GlanceServer, tmp_path: Path, kind: str
) -> None:
    vg, target = tmp_path / "vg", tmp_path / "target"
    target.write_bytes(b"not the cache's")
    images = [glance_server.create_image(disk_image(MiB, seed=153 + i)) for i in range(2)]
    for img in images:
        assert run_cli(glance_server.url, vg, "prefetch", img).returncode == 0
    locks, owners = vg / ".pvmcache" / "locks", vg / ".pvmcache" / "owners"
    owners.mkdir(exist_ok=True)  # where an older version kept owner locks
    planted = [
        locks / f"{uuid.uuid4()}.lock",
        locks / f"{uuid.uuid4()}.use",
        owners / "p_0123456789abc.lock",
        vg / "p_0123456789abc",  # under a temporary disk's name
    ]
    for path in planted:
        plant(path, kind, target)

    out = run_cli(None, vg, "prune", "--min-age", "0", "--json")

    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["removed"]) == 2  # both images pruned
    assert [r for r in json.loads(run_cli(None, vg, "ls", "--json").stdout)] == []
    warnings = out.stderr.strip().splitlines()
    for path in planted[:2] + planted[3:]:  # owner files: not read by a file VG at all
        assert sum(str(path) in line for line in warnings) == 1, (path, out.stderr)
    assert all("WARNING" in line for line in warnings), out.stderr
    for path in planted:
        assert os.path.lexists(path)  # skipped, not removed nor followed
    assert target.read_bytes() == b"not the cache's"


def test_an_image_whose_lock_file_was_replaced_by_a_symlink_is_kept_and_the_rest_pruned(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    vg, target = tmp_path / "vg", tmp_path / "target"
    target.write_bytes(b"not the cache's")
    kept, pruned = (glance_server.create_image(disk_image(MiB, seed=156 + i)) for i in range(2))
    for img in (kept, pruned):
        assert run_cli(glance_server.url, vg, "prefetch", img).returncode == 0
    lock = vg / ".pvmcache" / "locks" / f"{kept}.lock"
    lock.unlink()
    lock.symlink_to(target)

    out = run_cli(None, vg, "prune", "--min-age", "0", "--json")

    assert out.returncode == 0, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert str(lock) in line and "symbolic link" in line
    [row] = json.loads(run_cli(None, vg, "ls", "--json").stdout)
    assert row["image_id"] == kept and len(json.loads(out.stdout)["removed"]) == 1
    assert target.read_bytes() == b"not the cache's"


# -- the writer's side of the lock: from the file's creation to its publish ----------------


async def test_a_sweep_in_the_instant_before_the_writer_locks_its_new_file_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sweep finds the new file before its writer holds it, takes it for a dead writer's
    # and removes it: the writer notices and makes its file again, and publishes its bytes.
    vg = FileVG(tmp_path / "vg")
    real_flock = fcntl.flock
    swept: list[str] = []

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX and not swept:  # the writer's lock, not yet taken
            swept.extend(vg._remove_dead_temporaries())  # another process's sweep, now
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    partial = await vg.create_partial("p_0123456789abc", 3 * HOLE_BLOCK)
    monkeypatch.undo()
    assert swept == ["p_0123456789abc"]  # the first file was swept before it was locked
    assert await vg.remove_dead_temporaries() == []  # the one made again is held
    data = disk_image(3 * HOLE_BLOCK, seed=158)
    await partial.write(data)
    await partial.publish("i_0123456789abc")
    assert (vg.root / "i_0123456789abc").read_bytes() == data
    assert vg_files(vg.root) == ["i_0123456789abc"]
    await vg.close()


@pytest.mark.parametrize("ending", ["publish", "discard"])
async def test_a_writer_holds_its_temporary_until_it_is_published_or_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    # each unlink of a temporary name by its writer happens while its lock is still held:
    # a sweep looking then (another process) finds it held, never free and still named
    vg = FileVG(tmp_path / "vg")
    partial = await vg.create_partial("p_0123456789abc", HOLE_BLOCK)
    await partial.write(b"\1" * HOLE_BLOCK)
    path, real_unlink = vg.root / "p_0123456789abc", os.unlink
    seen: list[list[str]] = []

    def unlink(target: object, *args: object, **kwargs: object) -> None:
        if str(target) == str(path):
            seen.append(vg._remove_dead_temporaries())
        real_unlink(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    await (partial.publish("i_0123456789abc") if ending == "publish" else partial.discard())
    monkeypatch.undo()
    assert seen == [[]]  # the writer's own unlink, with its lock held: the sweep took nothing
    assert vg_files(vg.root) == (["i_0123456789abc"] if ending == "publish" else [])
    await vg.close()
