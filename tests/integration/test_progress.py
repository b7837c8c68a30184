"""Downloads you can watch: progress bars on a terminal, JSON events for scripts, and ``ls`` in
another process showing a download under way and whether its writer lives.

Each test holds a real download mid-way (a proxy stalls Glance's body after 3 MiB) in a
``pvmcache-async`` process of its own, looks at it from outside, then lets it finish."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pvmcache_async.core.progress import ProgressBoard, ProgressRecord, read_record
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import ThreadedFaultProxy, stall
from ..support import disk_image, vg_files

MiB = 1 << 20
SIZE = 8 * MiB
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    return clean | {"TERM": "xterm-256color", "COLUMNS": "120"}


def command(url: str, vg: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pvmcache_async",
        "--glance-url",
        url,
        "--vg",
        f"file:{vg}",
        *args,
    ]


def cli(vg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pvmcache_async", "--vg", f"file:{vg}", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60, check=False)


def wait_for_record(vg: Path, image_id: str, timeout: float = 60.0) -> ProgressRecord:
    """The download's record once it shows bytes written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_record(vg / ".pvmcache", image_id)
        if record is not None and record.done > 0:
            return record
        time.sleep(0.05)
    raise AssertionError(f"no progress recorded for {image_id}")


@dataclass
class Held:
    """A prefetch in a process of its own, its download stalled after 3 MiB."""

    image_id: str
    data: bytes
    vg: Path
    url: str  # the proxy's, for more processes on the same Glance
    proc: subprocess.Popen[str]
    proxy: ThreadedFaultProxy

    def release(self) -> tuple[str, str]:
        """Let the download finish; the prefetch's stdout and stderr."""
        self.proxy.release_stalls()
        stdout, stderr = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, stderr
        return stdout, stderr


def hold(
    glance: GlanceServer, tmp_path: Path, *args: str, stderr: int | None = None
) -> Iterator[Held]:
    data = disk_image(SIZE, seed=80)
    img = glance.create_image(data)
    vg = tmp_path / "vg"
    proxy = ThreadedFaultProxy(glance.url)
    with proxy as p:
        p.plan(img, stall(after=3 * MiB))
        proc = subprocess.Popen(
            command(p.url, vg, "prefetch", img, *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr is None else stderr,
            text=True,
            env=_env(),
        )
        try:
            yield Held(img, data, vg, p.url, proc, proxy)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=60)


@pytest.fixture
def held(glance_server: GlanceServer, tmp_path: Path) -> Iterator[Held]:
    yield from hold(glance_server, tmp_path, "--progress", "json", "--json")


def test_ls_shows_a_download_under_way_and_its_live_writer(held: Held) -> None:
    wait_for_record(held.vg, held.image_id)
    rows = json.loads(cli(held.vg, "ls", "--json").stdout)
    assert len(rows) == 1 and rows[0]["state"] == "filling"
    progress = rows[0]["progress"]
    assert progress["writer_pid"] == held.proc.pid and progress["writer_alive"] is True
    assert progress["total"] == SIZE and 0 < progress["done"] <= 3 * MiB
    keys = {"done", "total", "rate", "eta", "writer_pid", "writer_alive", "started", "updated"}
    assert set(progress) == keys

    text = cli(held.vg, "ls").stdout
    assert f"writer pid {held.proc.pid} alive" in text and "/8.0 MiB" in text

    held.release()
    ready = json.loads(cli(held.vg, "ls", "--json").stdout)
    assert ready[0]["state"] == "ready" and "progress" not in ready[0]  # the old keys, as they were
    assert not (held.vg / ".pvmcache" / "progress" / f"{held.image_id}.json").exists()


def test_ls_never_shows_a_dead_writer_s_download_and_prune_clears_what_it_left(
    held: Held,
) -> None:
    wait_for_record(held.vg, held.image_id)
    held.proc.send_signal(signal.SIGKILL)
    held.proc.wait(timeout=30)
    # the image's lock is free, so nobody fills it: its entry and record are a dead writer's
    assert json.loads(cli(held.vg, "ls", "--json").stdout) == []
    assert not (held.vg / ".pvmcache" / "progress" / f"{held.image_id}.json").exists()

    assert cli(held.vg, "prune", "--json").returncode == 0  # the partial, whose owner is dead
    assert vg_files(held.vg) == []


def test_progress_json_reports_bytes_then_the_result(held: Held) -> None:
    assert held.proc.stderr is not None and held.proc.stdout is not None
    events: list[dict[str, Any]] = []
    while not events or (events[-1]["event"] == "progress" and events[-1]["done"] == 0):
        events.append(json.loads(held.proc.stderr.readline()))  # (the first: from byte 0)
    at = events[-1]  # told while the download is held mid-way
    assert at["event"] == "progress" and at["total"] == SIZE and 0 < at["done"] < SIZE
    assert at["writer_pid"] == held.proc.pid and at["writer_alive"] is True
    held.proxy.release_stalls()
    events += [json.loads(line) for line in held.proc.stderr.read().splitlines()]
    stdout = held.proc.stdout.read()
    assert held.proc.wait(timeout=60) == 0
    moving = [e for e in events if e["event"] == "progress"]
    assert all(e["image_id"] == held.image_id for e in moving)
    keys = {"event", "image_id", "done", "total", "rate", "eta", "writer_pid", "writer_alive"}
    assert all(set(e) == keys for e in moving)
    assert events[-1] == {"event": "done", "image_id": held.image_id, "result": "miss"}
    assert json.loads(stdout)["result"] == "miss"  # stdout keeps only the result


def test_a_deploy_in_another_process_shows_the_download_it_waits_on(held: Held) -> None:
    wait_for_record(held.vg, held.image_id)
    instance = "5f2b1f4e-7a0c-4d8e-9b1a-2c3d4e5f6a7b"
    args = ["deploy", held.image_id, "--instance", instance, "--progress", "json", "--json"]
    joiner = subprocess.Popen(
        command(held.url, held.vg, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert joiner.stderr is not None
    ready, _, _ = select.select([joiner.stderr], [], [], 60)  # its first event, while held
    assert ready, "the joining deploy reported nothing"
    first = json.loads(joiner.stderr.readline())
    held.release()
    stdout, stderr = joiner.communicate(timeout=60)
    assert joiner.returncode == 0, stderr
    # the bytes of the other process's download, written by it, not by this one
    assert first["event"] == "progress" and first["writer_pid"] == held.proc.pid
    assert 0 < first["done"] < SIZE and first["writer_alive"] is True
    assert json.loads(stdout)["result"] == "joined"
    assert (held.vg / json.loads(stdout)["disk"]).read_bytes() == held.data


def _read_until(
    fd: int, seen: str, want: re.Pattern[str], timeout: float = 60.0, missing_ok: bool = False
) -> str:
    """Read a pty until its text (escapes removed) matches ``want``; all the text read."""
    deadline = time.monotonic() + timeout
    while not want.search(_ANSI.sub("", seen)):
        if time.monotonic() > deadline:
            if missing_ok:
                break
            raise AssertionError(f"never saw {want.pattern!r} in {_ANSI.sub('', seen)!r}")
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 65536).decode(errors="replace")
            except OSError:  # EIO: the other side closed
                break
    return seen


def test_prefetch_on_a_terminal_draws_a_live_progress_bar(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    master, slave = pty.openpty()
    try:
        for h in hold(glance_server, tmp_path, stderr=slave):
            os.close(slave)
            slave = -1
            short = h.image_id[:8]
            # mid-download: the image, how far, of what, a rate and a time left
            mid = _read_until(master, "", re.compile(rf"{short}.*25%.*2\.0 MiB/8\.0 MiB.*/s.*eta"))
            h.proxy.release_stalls()
            stdout, _ = h.proc.communicate(timeout=60)
            end = _ANSI.sub("", _read_until(master, mid, re.compile(rf"{short} miss.*100%")))
            assert h.proc.returncode == 0
            assert "8.0 MiB/8.0 MiB" in end
            assert f"image {h.image_id}:" in stdout  # the result line still goes to stdout
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_no_bars_when_stderr_is_no_terminal_or_with_json(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=81))
    piped = subprocess.run(
        command(glance_server.url, tmp_path / "a", "prefetch", img),
        capture_output=True, text=True, env=_env(), timeout=60, check=False,
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == ""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            command(glance_server.url, tmp_path / "b", "prefetch", img, "--json"),
            stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(), timeout=60, check=False,
        )  # fmt: skip
        os.close(slave)
        slave = -1
        assert proc.returncode == 0 and json.loads(proc.stdout)["result"] == "miss"
        assert _read_until(master, "", re.compile("."), timeout=0.5, missing_ok=True) == ""
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


async def test_a_link_planted_at_a_record_never_writes_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    image_id = "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00"
    records = tmp_path / "progress"
    records.mkdir()
    (records / f"{image_id}.json").symlink_to(victim)
    (records / f".{image_id}.{os.getpid()}.tmp").symlink_to(victim)
    board = ProgressBoard(tmp_path)
    async with board.meter(image_id, SIZE) as meter:
        meter.moved(MiB)
        for _ in range(100):  # the meter's own task writes the record
            record = read_record(tmp_path, image_id)
            if record is not None and record.done == MiB:
                break
            await asyncio.sleep(0.02)
        assert record is not None and record.done == MiB
    assert victim.read_text() == "precious"
    assert list(records.iterdir()) == []
