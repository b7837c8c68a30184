"""Faults between the cache and the real Glance: each ends in correct disks or a stated error.

The fault proxy (``tests/faultproxy.py``) sits between the client and the session's Glance and
breaks exactly the requests a test plans. After every fault the VG holds nothing partial
under a real name: only verified ``i_`` disks and complete instance disks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvmcache_async import (
    DiskExists,
    GlanceClient,
    GlanceError,
    ImageCache,
    ImageNotFound,
    ImageUnavailable,
    IntegrityError,
    Outcome,
)
from pvmcache_async.glance.records import parse_image
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.models import ImageInfo
from pvmcache_async.storage.filevg import FileVG
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import FaultProxy, ThreadedFaultProxy, answer, cut, flip, ignore_range, stall
from ..support import disk_image, vg_files

MiB = 1 << 20
CHUNK = 64 << 10
FAST = RetryPolicy(retries=3, backoff=0.01, max_backoff=0.05)


@pytest.fixture
async def proxy(glance_server: GlanceServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(glance_server.url) as p:
        yield p


def _client(url: str, read_timeout: float = 30.0) -> GlanceClient:
    return GlanceClient(url, chunk_size=CHUNK, read_timeout=read_timeout, retry=FAST)


@pytest.fixture
async def cache(tmp_path: Path, proxy: FaultProxy) -> AsyncIterator[ImageCache]:
    c = ImageCache(FileVG(tmp_path / "vg"), _client(proxy.url))
    yield c
    await c.close()


def _assert_vg_clean(root: Path, data: dict[str, bytes], disks: dict[str, str]) -> None:
    """Only verified cache disks and complete instance disks; ``disks``: disk -> image."""
    for name in vg_files(root):
        assert name.startswith(("i_", "b_")), f"partial or temporary disk {name} left"
    for disk, image in disks.items():
        assert (root / disk).read_bytes() == data[image], f"{disk} differs from {image}"


async def _deploy_many(cache: ImageCache, image: str, n: int) -> list[object]:
    insts = [str(uuid.uuid4()) for _ in range(n)]
    return await asyncio.gather(*(cache.deploy(image, i) for i in insts), return_exceptions=True)


async def test_a_dropped_response_resumes_from_the_last_byte_written(
    proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(3 * MiB, seed=40)
    img = glance_server.create_image(data)
    cut_at = MiB + 12345
    proxy.plan(img, cut(after=cut_at))
    # A chunk of the size class used in production (the default is 2 MiB): what aiohttp reads
    # ahead and drops at the cut is bounded by its read buffer, a fraction of the chunk.
    chunk = MiB
    client = GlanceClient(proxy.url, chunk_size=chunk, read_timeout=30.0, retry=FAST)
    cache = ImageCache(FileVG(tmp_path / "vg"), client)
    try:
        results = await _deploy_many(cache, img, 6)
    finally:
        await cache.close()

    assert all(not isinstance(r, BaseException) for r in results), results
    gets = proxy.file_gets(img)
    assert len(gets) == 2 and gets[0].range is None
    resumed_from = int(gets[1].range.removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert 0 <= cut_at - resumed_from < chunk  # re-downloaded less than one read chunk
    assert gets[1].status == 206
    assert sum(g.body_sent for g in gets) - len(data) == cut_at - resumed_from
    assert sum(r.bytes_fetched for r in results) == len(data)  # type: ignore[union-attr]
    _assert_vg_clean(tmp_path / "vg", {img: data}, {r.disk: img for r in results})  # type: ignore[union-attr]


async def test_a_stalled_response_times_out_and_resumes(
    proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(2 * MiB, seed=41)
    img = glance_server.create_image(data)
    proxy.plan(img, stall(after=700_000))
    cache = ImageCache(FileVG(tmp_path / "vg"), _client(proxy.url, read_timeout=1.0))
    try:
        results = await _deploy_many(cache, img, 4)
    finally:
        await cache.close()

    assert all(not isinstance(r, BaseException) for r in results), results
    gets = proxy.file_gets(img)
    assert len(gets) == 2 and gets[1].status == 206
    # the timeout found the last, partial chunk in hand and wrote it: nothing is fetched twice
    assert gets[1].range == "bytes=700000-" and 700_000 % CHUNK
    _assert_vg_clean(tmp_path / "vg", {img: data}, {r.disk: img for r in results})  # type: ignore[union-attr]


async def test_a_flipped_byte_fails_every_waiter_and_the_next_deploy_starts_afresh(
    cache: ImageCache, proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(2 * MiB, seed=42)
    img = glance_server.create_image(data)
    proxy.plan(img, flip(at=MiB + 7))

    results = await _deploy_many(cache, img, 5)

    assert all(isinstance(r, IntegrityError) for r in results), results
    message = str(results[0])
    assert "sha512 checksum did not match" in message and img in message
    assert vg_files(tmp_path / "vg") == [] and await cache.entries() == []
    assert list((tmp_path / "vg" / ".pvmcache" / "locks").iterdir()) == []  # nor a lock file
    assert len(proxy.file_gets(img)) == 1  # a digest mismatch is not retried

    again = await cache.deploy(img, str(uuid.uuid4()))
    assert again.outcome is Outcome.MISS
    assert proxy.file_gets(img)[-1].range is None  # downloaded afresh from byte 0
    _assert_vg_clean(tmp_path / "vg", {img: data}, {again.disk: img})


@pytest.mark.parametrize(
    "fault", [answer(503), answer(429, retry_after=0), answer(502)], ids=["503", "429", "502"]
)
async def test_transient_answers_are_retried_until_the_data_comes(
    cache: ImageCache,
    proxy: FaultProxy,
    glance_server: GlanceServer,
    tmp_path: Path,
    fault: object,
) -> None:
    data = disk_image(MiB, seed=43)
    img = glance_server.create_image(data)
    proxy.plan(img, fault, fault)  # type: ignore[arg-type]

    results = await _deploy_many(cache, img, 3)

    assert all(not isinstance(r, BaseException) for r in results), results
    assert [g.status for g in proxy.file_gets(img)] == [fault.status] * 2 + [200]  # type: ignore[attr-defined]
    _assert_vg_clean(tmp_path / "vg", {img: data}, {r.disk: img for r in results})  # type: ignore[union-attr]


async def test_retries_are_bounded_and_the_error_names_the_image_and_last_cause(
    cache: ImageCache, proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=44))
    proxy.plan(img, *[answer(503)] * 10)

    results = await _deploy_many(cache, img, 3)

    assert all(isinstance(r, GlanceError) for r in results), results
    message = str(results[0])
    assert img in message and "after 3 failed attempts" in message and "HTTP 503" in message
    assert len(proxy.file_gets(img)) == FAST.retries  # --retries: the failed attempts in all
    assert vg_files(tmp_path / "vg") == [] and await cache.entries() == []


async def test_a_4xx_answer_is_not_retried(
    cache: ImageCache, proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=45))
    proxy.plan(img, answer(404))
    with pytest.raises(ImageNotFound, match=img):
        await cache.deploy(img, str(uuid.uuid4()))
    assert len(proxy.file_gets(img)) == 1
    assert vg_files(tmp_path / "vg") == []


@pytest.mark.parametrize(
    "refusal", [answer(416), answer(400), ignore_range()], ids=["416", "400", "200-ignored"]
)
async def test_a_server_that_will_not_resume_makes_the_download_start_over(
    cache: ImageCache,
    proxy: FaultProxy,
    glance_server: GlanceServer,
    tmp_path: Path,
    refusal: object,
) -> None:
    data = disk_image(2 * MiB, seed=46)
    img = glance_server.create_image(data)
    proxy.plan(img, cut(after=MiB), refusal)  # type: ignore[arg-type]

    result = await cache.deploy(img, str(uuid.uuid4()))

    gets = proxy.file_gets(img)
    assert gets[1].range is not None  # it asked to resume
    if refusal.kind == "ignore_range":  # type: ignore[attr-defined]
        assert [g.status for g in gets] == [200, 200]  # the full body of the 200 was used
    else:
        assert len(gets) == 3 and gets[2].range is None  # asked again, without Range
    _assert_vg_clean(tmp_path / "vg", {img: data}, {result.disk: img})


async def test_a_refused_connection_is_retried_then_named_in_the_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    img = str(uuid.uuid4())
    cache = ImageCache(FileVG(tmp_path / "vg"), _client(f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(GlanceError, match=f"image {img}: giving up .* after 3 failed"):
            await cache.ensure(img)
    finally:
        await cache.close()
    assert vg_files(tmp_path / "vg") == []


async def test_a_record_that_is_not_json_is_a_clear_error(
    cache: ImageCache, proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=47))
    proxy.plan(img, answer(200, body=b'{"status": "act'), what="record")
    with pytest.raises(GlanceError, match="not JSON") as info:
        await cache.deploy(img, str(uuid.uuid4()))
    assert img in str(info.value) and "\n" not in str(info.value)
    assert vg_files(tmp_path / "vg") == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"size": None}, "invalid size"),
        ({"size": True}, "invalid size"),
        ({"size": 1 << 60}, "invalid size"),
        ({"size": -1}, "invalid size"),
        ({"status": "killed"}, "'killed'"),
        ({"status": "deactivated"}, "'deactivated'"),
        ({"os_hash_value": "zz", "checksum": None}, "no usable os_hash_value: 'zz'"),
        ({"os_hash_value": "ab" * 32}, r"not a sha512 digest \(128 hex digits\)"),
        ({"os_hash_algo": None, "os_hash_value": None}, "has no checksum"),
        ({"id": "00000000-0000-0000-0000-000000000000"}, "another image"),
    ],
)
def test_malformed_or_unusable_records_are_refused(change: dict[str, object], message: str) -> None:
    img = str(uuid.uuid4())
    record: dict[str, object] = {
        "id": img,
        "status": "active",
        "disk_format": "raw",
        "size": 1024,
        "os_hash_algo": "sha512",
        "os_hash_value": "ab" * 64,
        "checksum": None,
    }
    record.update(change)
    with pytest.raises(GlanceError, match=message) as info:
        parse_image(img, record)
    assert str(info.value).startswith(f"image {img}: ")


_RECORD: dict[str, object] = {
    "status": "active",
    "disk_format": "raw",
    "size": 1024,
    "checksum": "0123456789abcdef" * 2,
}


@pytest.mark.parametrize("algo", ["sha3_512", "blake2b", "sha384", "sha3_256", "sha1"])
def test_the_algorithm_glance_names_is_used_with_its_own_digest_length(algo: str) -> None:
    img = str(uuid.uuid4())
    value = hashlib.new(algo, b"x").hexdigest().upper()  # Glance's case is not ours to trust
    info = parse_image(img, {**_RECORD, "id": img, "os_hash_algo": algo, "os_hash_value": value})
    assert (info.digest_algo, info.digest) == (algo, value.lower())
    with pytest.raises(ImageUnavailable, match=f"not a {algo} digest"):
        parse_image(img, {**_RECORD, "os_hash_algo": algo, "os_hash_value": value[:-2]})


@pytest.mark.parametrize(
    "algo, value",
    [
        ("whirlpool-9000", "ab" * 64),
        ("shake_256", "ab" * 64),  # variable length: no digest size to check against
        ("sha512", None),  # half of the pair: the md5 checksum is not used instead
        (None, "ab" * 64),
        (42, "ab" * 64),
    ],
)
def test_an_os_hash_that_cannot_be_checked_is_refused_never_replaced_by_md5(
    algo: object, value: object
) -> None:
    img = str(uuid.uuid4())
    record = {**_RECORD, "id": img, "os_hash_algo": algo, "os_hash_value": value}
    with pytest.raises(ImageUnavailable) as err:
        parse_image(img, record)
    message = str(err.value)
    assert message.startswith(f"image {img}: ") and "\n" not in message
    if isinstance(algo, str) and value is not None:
        assert f"os_hash_algo {algo!r}" in message and "hashlib cannot compute" in message


def test_without_any_os_hash_the_legacy_md5_checksum_is_used() -> None:
    img = str(uuid.uuid4())
    info = parse_image(img, {**_RECORD, "id": img, "os_hash_algo": None, "os_hash_value": None})
    assert (info.digest_algo, info.digest) == ("md5", _RECORD["checksum"])


@pytest.mark.parametrize("right", [True, False], ids=["matching", "mismatching"])
async def test_a_download_is_verified_with_the_algorithm_glance_names(
    proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path, right: bool
) -> None:
    # The dev Glance hashes with sha512; the proxy serves its record as a Glance configured
    # with hashing_algorithm = sha3_512 would, md5 checksum included (which matches either way)
    data = disk_image(MiB, seed=52)
    img = glance_server.create_image(data)
    record = glance_server.image(img)
    digest = hashlib.sha3_512(data if right else data + b"!").hexdigest()
    record.update(os_hash_algo="sha3_512", os_hash_value=digest)
    proxy.plan(img, answer(200, body=json.dumps(record).encode()), what="record")
    cache = ImageCache(FileVG(tmp_path / "vg"), _client(proxy.url))
    try:
        if right:
            result = await cache.deploy(img, str(uuid.uuid4()))
            assert (tmp_path / "vg" / result.disk).read_bytes() == data
        else:
            with pytest.raises(IntegrityError, match=f"image {img}: sha3_512 checksum did not"):
                await cache.deploy(img, str(uuid.uuid4()))
            assert vg_files(tmp_path / "vg") == []
    finally:
        await cache.close()


async def test_a_queued_image_has_no_data_to_download(glance_server: GlanceServer) -> None:
    img = glance_server.create_image(None)  # Glance answers 204 to its file
    client = _client(glance_server.url)
    info = ImageInfo(img, None, 1024, "md5", "0" * 32)
    try:
        with pytest.raises(ImageUnavailable, match="no data in Glance"):
            await client.download(info, _NullSink())
    finally:
        await client.close()


async def test_an_image_deleted_after_its_record_was_read_is_not_found(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=48))
    client = _client(glance_server.url)
    try:
        info = await client.get_image(img)
        glance_server.delete(img)
        with pytest.raises(ImageNotFound, match=f"image {img}: not found"):
            await client.download(info, _NullSink())
    finally:
        await client.close()


async def test_an_image_deactivated_mid_deploy_is_refused_to_a_member(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from pvmcache_dev.glance import MEMBER_HEADERS

    server = GlanceServer.start(tmp_path_factory.mktemp("trusted"), trusted_headers=True)
    proxy = await FaultProxy(server.url, extra_headers=MEMBER_HEADERS).start()
    client = _client(proxy.url)
    try:
        img = server.create_image(disk_image(MiB, seed=49))
        info = await client.get_image(img)
        server.deactivate(img)
        with pytest.raises(ImageUnavailable, match="HTTP 403: deactivated") as err:
            await client.download(info, _NullSink())
        assert img in str(err.value)
        assert len(proxy.file_gets(img)) == 1  # a 403 is final
    finally:
        await client.close()
        await proxy.close()
        server.stop()


class _NullSink:
    async def write(self, chunk: bytes) -> None:
        pass

    async def rewind(self) -> None:
        pass


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm to mount a small tmpfs")
def test_a_download_takes_its_room_up_front_and_another_process_is_refused_before_fetching(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    # Two 3 MiB images fit one at a time into a 5 MiB tmpfs, not both. Process A prefetches
    # one, and the proxy holds its data back: its partial disk has taken its 3 MiB (fallocate)
    # and nothing has arrived. Process B, prefetching the other, must then be refused with a
    # one-line error before it asks Glance for a byte; A completes once released.
    # all random: zero runs would become holes (sparse ingest) and both would fit
    data = [random.Random(50 + i).randbytes(3 * MiB) for i in range(2)]
    imgs = [glance_server.create_image(d) for d in data]
    vg, go, b_done = tmp_path / "vg", tmp_path / "go", tmp_path / "b_done"
    vg.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    threaded = ThreadedFaultProxy(glance_server.url)
    with threaded as proxy:
        proxy.plan(imgs[0], stall(after=0))
        cli = f'{sys.executable} -m pvmcache_async --glance-url {proxy.url} --vg "file:{vg}"'
        script = (
            f'mount -t tmpfs -o size=5m tmpfs "{vg}" && {{ '
            f'( {cli} prefetch {imgs[0]}; echo "a rc=$?" ) & '
            f'while [ ! -e "{go}" ]; do sleep 0.02; done; '
            f'{cli} prefetch {imgs[1]}; echo "b rc=$?"; touch "{b_done}"; wait; }}; '
            f'echo files:; cd "{vg}" && for f in *; do [ -f "$f" ] || continue; '
            'echo "$f $(sha256sum < "$f" | cut -c1-64)"; done'
        )
        run = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while not proxy.file_gets(imgs[0]) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proxy.file_gets(imgs[0]), "A's download should have started"
            go.touch()  # A holds its room and has written nothing: now B
            while not b_done.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert b_done.exists(), "B should have ended while A was held"
            assert proxy.file_gets(imgs[1]) == []  # refused before it asked for a byte
            threaded.release_stalls()  # on the proxy's own loop thread
            stdout, stderr = run.communicate(timeout=120)
        finally:
            run.kill()
    lines = stdout.splitlines()
    assert "a rc=0" in lines and "b rc=1" in lines, (stdout, stderr)
    (error,) = stderr.strip().splitlines()
    assert f"image {imgs[1]}: needs {3 * MiB} bytes but the volume group has" in error, stderr
    files = dict(line.split(" ", 1) for line in lines[lines.index("files:") + 1 :])
    assert list(files.values()) == [hashlib.sha256(data[0]).hexdigest()]
    assert all(name.startswith("i_") for name in files), files  # no partial left behind


class _HeldCloneVG(FileVG):
    """A file VG whose clones start only once ``go`` is set (a real clone, just held)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cloning = asyncio.Event()
        self.go = threading.Event()

    async def clone(self, source: str, target: str, size: int | None = None) -> None:
        self.cloning.set()
        await asyncio.to_thread(self.go.wait, 30)
        await super().clone(source, target, size)


async def test_a_deploy_cancelled_mid_clone_leaves_no_instance_disk(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=51)
    img = glance_server.create_image(data)
    vg = _HeldCloneVG(tmp_path / "vg")
    cache = ImageCache(vg, _client(glance_server.url))
    try:
        await cache.ensure(img)  # cached first: a cold deploy writes its disk while downloading
        task = asyncio.create_task(cache.deploy(img, str(uuid.uuid4())))
        await asyncio.wait_for(vg.cloning.wait(), 30)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # it waits for the clone it cannot stop
        vg.go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [n for n in vg_files(tmp_path / "vg") if not n.startswith("i_")] == []
        kept = await cache.deploy(img, str(uuid.uuid4()))  # the cache disk itself stays
        assert kept.outcome is Outcome.HIT
    finally:
        vg.go.set()
        await cache.close()


def test_the_cli_gives_up_after_its_retries_with_one_line_naming_the_image(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    img = str(uuid.uuid4())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    env["PVMCACHE_RETRIES"] = "1"
    args = ["--glance-url", f"http://127.0.0.1:{port}", "--vg", f"file:{tmp_path / 'vg'}"]
    out = subprocess.run(
        [sys.executable, "-m", "pvmcache_async", *args, "deploy", img, "--instance", img],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert img in line and "after 1 failed attempt in a row" in line and "Traceback" not in line
    assert vg_files(tmp_path / "vg") == []


@pytest.mark.parametrize("what", ["record", "file"])
def test_the_cli_s_retries_are_the_failed_attempts_in_a_row_before_it_gives_up(
    glance_server: GlanceServer, tmp_path: Path, what: str
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=52))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    with ThreadedFaultProxy(glance_server.url) as proxy:
        proxy.plan(img, *[answer(503)] * 20, what=what)  # a Glance that always fails
        args = ["--glance-url", proxy.url, "--retries", "5", "--vg", f"file:{tmp_path / 'vg'}"]
        out = subprocess.run(
            [sys.executable, "-m", "pvmcache_async", *args, "prefetch", img],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        asked = [s for s in proxy.seen if s.path.startswith(f"/v2/images/{img}")]
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert (
        f"image {img}: giving up on the image {'record' if what == 'record' else 'data'} " in line
    )
    assert "after 5 failed attempts in a row; last: Glance answered HTTP 503" in line
    assert [s.status for s in asked if s.fault is not None] == [503] * 5
    assert vg_files(tmp_path / "vg") == []


@pytest.mark.parametrize("same", [False, True], ids=["shared-prefix", "same-instance"])
async def test_a_deploy_for_a_disk_name_another_deploy_is_making_fails_at_once(
    proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path, same: bool
) -> None:
    data = disk_image(MiB, seed=53)
    img = glance_server.create_image(data)
    first = str(uuid.uuid4())
    # the same first 13 characters: the same disk name, b_xxxxxxxx_xxxx
    second = first if same else first[:14] + str(uuid.uuid4())[14:]
    proxy.plan(img, stall(after=MiB // 2))
    cache = ImageCache(FileVG(tmp_path / "vg"), _client(proxy.url))
    try:
        deploying = asyncio.create_task(cache.deploy(img, first))
        await asyncio.to_thread(proxy.stalled.wait)  # the first is downloading
        with pytest.raises(DiskExists) as err:
            await cache.deploy(img, second)
        proxy.release_stalls()
        made = await deploying
    finally:
        proxy.release_stalls()
        await cache.close()
    disk = "b_" + first[:13].replace("-", "_")
    if same:
        assert (
            str(err.value)
            == f"image {img}: instance {first}: its disk {disk} is being made by another deploy"
        )
    else:
        assert (
            str(err.value)
            == f"image {img}: instances {first} and {second} would both get disk {disk}"
        )
    assert len(proxy.file_gets(img)) == 1  # the second asked for nothing
    assert made.disk == disk and (tmp_path / "vg" / disk).read_bytes() == data
    assert sorted(vg_files(tmp_path / "vg")) == [disk, "i_" + img[:13].replace("-", "_")]
