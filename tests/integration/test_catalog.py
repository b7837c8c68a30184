"""Trust in the index (``catalog``): what an operator or an attacker does to the index and to
the disks it names. A hit never serves another image's bytes; a row out of range is one warning,
never a crash; a date ahead of the clock defeats no budget; a disk that a dropped row leaves
behind is entered again or removed, never leaked; a disk enters a rebuilt index only once its
bytes match its recorded digest.

Real Glance, real processes (the command line), real files; the index altered with the sqlite3
command line, the disks with ``mv`` and ``setxattr`` as an operator would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pvmcache_async import CacheEntry, EntryState
from pvmcache_async.core.index import BadRow, Index
from pvmcache_async.names import cache_disk_names
from pvmcache_dev.glance import GlanceServer

from ..support import disk_image, run_cli, vg_files

MiB = 1 << 20
TEN_YEARS = 10 * 365 * 86400


def _ok(out: subprocess.CompletedProcess[str]) -> object:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _ls(vg: Path) -> list[dict[str, object]]:
    rows = _ok(run_cli(None, vg, "ls", "--json"))
    assert isinstance(rows, list)
    return rows


def _deploy(url: str, vg: Path, img: str) -> dict[str, object]:
    row = _ok(run_cli(url, vg, "deploy", img, "--instance", str(uuid.uuid4()), "--json"))
    assert isinstance(row, dict)
    return row


def _sql(vg: Path, statement: str) -> None:
    """Run ``statement`` on the VG's index as an operator would: the sqlite3 command line."""
    index = vg / ".pvmcache" / "index.sqlite"
    if shutil.which("sqlite3") is None:  # the same statement through Python's own sqlite
        db = sqlite3.connect(index)
        with db:
            db.executescript(statement)
        db.close()
        return
    subprocess.run(["sqlite3", str(index), statement], check=True, timeout=60)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _warnings(stderr: str, what: str) -> list[str]:
    return [line for line in stderr.splitlines() if what in line]


# -- a hit serves only the image's own disk (issue 15, defect 1) ------------------------------


def test_a_cache_disk_moved_over_another_images_name_is_never_served_as_a_hit(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data_a, data_b = disk_image(MiB, seed=140), disk_image(MiB, seed=141)  # the same size
    a, b = glance_server.create_image(data_a), glance_server.create_image(data_b)
    vg = tmp_path / "vg"
    disk_a = str(_deploy(glance_server.url, vg, a)["cache_disk"])
    disk_b = str(_deploy(glance_server.url, vg, b)["cache_disk"])
    subprocess.run(["mv", str(vg / disk_b), str(vg / disk_a)], check=True)  # B's bytes at A's

    again = _deploy(glance_server.url, vg, a)

    assert again["result"] == "miss" and again["cache_disk"] != disk_a
    assert _sha(vg / str(again["disk"])) == hashlib.sha256(data_a).hexdigest()
    assert glance_server.file_requests(a) == 2
    assert _sha(vg / disk_a) == hashlib.sha256(data_b).hexdigest()  # not A's: left alone
    listed = {r["image_id"]: r["cache_disk"] for r in _ls(vg)}
    assert listed[a] == again["cache_disk"]


# -- dates ahead of the clock (rough edge 5) --------------------------------------------------


@pytest.mark.parametrize(
    "budget", [["--min-age", "0", "--max-count", "0"], ["--max-bytes", "0"]], ids=["count", "bytes"]
)
def test_an_image_used_in_the_future_is_not_immune_to_a_budget(
    glance_server: GlanceServer, tmp_path: Path, budget: list[str]
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=142))
    vg = tmp_path / "vg"
    cache_disk = _deploy(glance_server.url, vg, img)["cache_disk"]
    future = time.time() + TEN_YEARS
    _sql(vg, f"UPDATE images SET created = {future}, last_used = {future};")

    listed = run_cli(None, vg, "ls")
    assert listed.returncode == 0, listed.stderr
    [line] = [x for x in listed.stdout.splitlines() if img in x]
    assert "was ahead of the clock: counted as now" in line
    [entry] = _ls(vg)
    assert entry["clock_ahead"] is True and str(entry["last_used"]) < "2100"

    pruned = _ok(run_cli(None, vg, "prune", *budget, "--json"))

    assert pruned == {"removed": [cache_disk], "kept": []}
    assert _ls(vg) == []


def test_a_hit_sets_a_last_use_ahead_of_the_clock_right(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=143))
    vg = tmp_path / "vg"
    _deploy(glance_server.url, vg, img)
    _sql(vg, f"UPDATE images SET last_used = {time.time() + TEN_YEARS};")

    assert _deploy(glance_server.url, vg, img)["result"] == "hit"

    [entry] = _ls(vg)
    assert "clock_ahead" not in entry
    db = sqlite3.connect(vg / ".pvmcache" / "index.sqlite")
    [(last_used,)] = db.execute("SELECT last_used FROM images").fetchall()
    db.close()
    assert last_used <= time.time()


# -- values out of range (rough edge 9) -------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "problem"),
    [
        ("last_used = 'nan'", "last_used 'nan' is not a unix time"),
        ("created = -5", "created -5.0 is not a unix time"),
        ("last_used = x'00ff'", "last_used b'\\x00\\xff' is not a unix time"),
        ("size = -1", "size -1 is not from 1 to"),
        ("size = 4611686018427387904", "size 4611686018427387904 is not from 1 to"),
        ("size = 'big'", "size 'big' is not from 1 to"),
        ("state = 'bogus'", "state 'bogus' is not one of filling, ready"),
        ("digest_algo = x'00'", "digest_algo b'\\x00' is not a short text"),
    ],
)
def test_an_index_row_out_of_range_is_one_warning_and_its_disk_is_checked_and_kept(
    glance_server: GlanceServer, tmp_path: Path, assignment: str, problem: str
) -> None:
    data = disk_image(MiB, seed=144)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    cache_disk = _deploy(glance_server.url, vg, img)["cache_disk"]
    _sql(vg, f"UPDATE images SET {assignment};")

    listed = run_cli(None, vg, "ls", "--json")

    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []  # never shown
    [warning] = _warnings(listed.stderr, "index row of image")
    assert img in warning and problem in warning, warning
    # the row is dropped; the image's own disk, checked against its digest, is entered again
    again = _deploy(glance_server.url, vg, img)
    assert (again["result"], again["cache_disk"]) == ("hit", cache_disk)
    assert glance_server.file_requests(img) == 1
    assert _sha(vg / str(again["disk"])) == hashlib.sha256(data).hexdigest()


def test_a_row_whose_digest_was_altered_keeps_a_disk_that_matches_its_own_digest(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=151)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    cache_disk = _deploy(glance_server.url, vg, img)["cache_disk"]
    _sql(vg, "UPDATE images SET digest = 'f00d';")

    again = _deploy(glance_server.url, vg, img)

    # the disk's own identity disagrees with the row: never served on the row's word, but
    # re-hashed against the digest it records, and kept (the row was what was altered)
    assert (again["result"], again["cache_disk"]) == ("hit", cache_disk)
    assert glance_server.file_requests(img) == 1
    db = sqlite3.connect(vg / ".pvmcache" / "index.sqlite")
    [(digest,)] = db.execute("SELECT digest FROM images").fetchall()
    db.close()
    assert digest == glance_server.image(img)["os_hash_value"]


def test_a_last_use_of_1e300_is_listed_as_now(glance_server: GlanceServer, tmp_path: Path) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=145))
    vg = tmp_path / "vg"
    _deploy(glance_server.url, vg, img)
    _sql(vg, "UPDATE images SET last_used = 1e300;")

    for args in (["ls"], ["ls", "--json"]):
        listed = run_cli(None, vg, *args)
        assert listed.returncode == 0, listed.stderr
        assert img in listed.stdout
        assert len(_warnings(listed.stderr, "ahead of the clock")) == 1, listed.stderr


def test_a_row_whose_image_id_is_not_canonical_is_ignored_and_the_image_cached_anew(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=146))
    vg = tmp_path / "vg"
    _deploy(glance_server.url, vg, img)
    _sql(vg, f"UPDATE images SET image_id = '{img.upper()}';")

    listed = run_cli(None, vg, "ls", "--json")

    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    [warning] = _warnings(listed.stderr, "index row of image")
    assert "is not in canonical form" in warning
    assert _deploy(glance_server.url, vg, img)["result"] == "miss"


def _index_with(tmp_path: Path, **values: object) -> Index:
    """An index holding one ready row, with ``values`` stored as they are (any sqlite type)."""
    path = tmp_path / "index.sqlite"
    img = str(uuid.uuid4())
    Index(path).insert(CacheEntry(img, "i_x", MiB, "sha512", "0" * 128, 1.0, 1.0, EntryState.READY))
    db = sqlite3.connect(path)
    with db:
        for column, value in values.items():
            db.execute(f"UPDATE images SET {column} = ?", (value,))
    db.close()
    return Index(path)


@pytest.mark.parametrize("value", [1e300, float("inf"), 4e9])
def test_a_time_ahead_of_the_clock_is_read_as_now_and_a_touch_sets_it_right(
    tmp_path: Path, value: float
) -> None:
    index = _index_with(tmp_path, last_used=value)
    before = time.time()
    [entry] = index.entries()
    assert isinstance(entry, CacheEntry) and entry.clock_ahead
    assert before <= entry.last_used <= time.time()

    index.touch(entry.image_id, before)

    [touched] = index.entries()
    assert isinstance(touched, CacheEntry) and not touched.clock_ahead
    assert touched.last_used == before


@pytest.mark.parametrize(
    "values",
    [
        {"last_used": "nan"},
        {"created": -1.0},
        {"size": 0},
        {"size": 1 << 62},
        {"size": 1.5},
        {"state": "READY"},
        {"cache_disk": b"i_x"},
        {"digest": "0" * 1000},
    ],
    ids=repr,
)
def test_a_row_out_of_range_is_read_as_a_bad_row(tmp_path: Path, values: dict[str, object]) -> None:
    [row] = _index_with(tmp_path, **values).entries()
    assert isinstance(row, BadRow) and row.image_id is not None
    assert next(iter(values)) in row.reason


# -- a dropped row leaves no disk behind (rough edge 7) ----------------------------------------


def test_the_disk_a_dropped_row_no_longer_named_is_served_again_not_downloaded_again(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=147)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    first = _deploy(glance_server.url, vg, img)
    _sql(vg, f"UPDATE images SET cache_disk = '{first['disk']}';")  # names the instance disk

    again = _deploy(glance_server.url, vg, img)

    assert (again["result"], again["cache_disk"]) == ("hit", first["cache_disk"])
    assert glance_server.file_requests(img) == 1  # never downloaded under a hashed name
    assert _sha(vg / str(first["disk"])) == hashlib.sha256(data).hexdigest()  # untouched
    assert sorted(vg_files(vg)) == sorted([first["cache_disk"], first["disk"], again["disk"]])


# -- a rebuild re-hashes what it adopts (rough edge 8) ---------------------------------------


def _forge(path: Path, image: dict[str, object], data: bytes) -> None:
    """A disk planted at ``path`` with ``data`` and the identity xattrs of ``image``."""
    path.write_bytes(data)
    os.setxattr(path, "user.pvmcache.image_id", str(image["id"]).encode())
    os.setxattr(path, "user.pvmcache.size", str(image["size"]).encode())
    digest = f"{image['os_hash_algo']}:{image['os_hash_value']}"
    os.setxattr(path, "user.pvmcache.digest", digest.encode())


def test_a_disk_with_a_forged_identity_is_not_adopted_by_a_rebuild(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data, wrong = disk_image(MiB, seed=148), disk_image(MiB, seed=149)
    real, forged = glance_server.create_image(data), glance_server.create_image(data)
    vg = tmp_path / "vg"
    real_disk = str(_deploy(glance_server.url, vg, real)["cache_disk"])
    (vg / ".pvmcache" / "index.sqlite").unlink()  # the index lost
    planted = vg / next(cache_disk_names(forged))
    try:
        _forge(planted, glance_server.image(forged), wrong)
    except OSError as exc:
        pytest.skip(f"no user xattrs on {vg}: {exc}")

    listed = run_cli(None, vg, "ls", "--json")

    assert listed.returncode == 0, listed.stderr
    assert [(r["image_id"], r["cache_disk"]) for r in json.loads(listed.stdout)] == [
        (real, real_disk)  # a true disk is re-hashed and adopted; the forged one is not
    ]
    [warning] = _warnings(listed.stderr, "but its bytes hash to")
    assert planted.name in warning and "not adopted" in warning
    again = _deploy(glance_server.url, vg, forged)
    assert again["result"] == "miss" and again["cache_disk"] != planted.name
    assert _sha(vg / str(again["disk"])) == hashlib.sha256(data).hexdigest()
    assert planted.read_bytes() == wrong  # not the cache's: left alone


@pytest.mark.parametrize("digest", [b":", b"sha512:", b"nosuchalgo:00"])
def test_a_disk_whose_recorded_digest_cannot_be_checked_is_not_adopted(
    glance_server: GlanceServer, tmp_path: Path, digest: bytes
) -> None:
    data = disk_image(MiB, seed=150)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    cache_disk = str(_deploy(glance_server.url, vg, img)["cache_disk"])
    (vg / ".pvmcache" / "index.sqlite").unlink()
    os.setxattr(vg / cache_disk, "user.pvmcache.digest", digest)

    assert _ls(vg) == []

    assert _deploy(glance_server.url, vg, img)["result"] == "miss"


# -- corrupt copies set aside (issue 15, minor 14) --------------------------------------------


def test_corrupt_index_copies_set_aside_in_the_same_second_each_keep_their_own_name(
    tmp_path: Path,
) -> None:
    vg = tmp_path / "vg"
    state = vg / ".pvmcache"
    state.mkdir(parents=True)
    now = int(time.time())
    planted = {}  # earlier copies, one for each second this test can take
    for second in range(now - 1, now + 300):
        planted[second] = state / f"index.sqlite.corrupt-{second}"
        planted[second].write_bytes(f"copy {second}".encode())
    garbage = os.urandom(8192)
    (state / "index.sqlite").write_bytes(garbage)

    assert _ls(vg) == []

    for second, path in planted.items():
        assert path.read_bytes() == f"copy {second}".encode()
    [aside] = [p for p in state.iterdir() if p.name.endswith(".1")]
    assert aside.read_bytes() == garbage
