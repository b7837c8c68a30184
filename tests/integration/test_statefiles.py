"""What an operator plants under ``.pvmcache`` and what the cache does with it: progress records
that are huge, links, FIFOs or nested JSON; a progress directory that is a link; a VG that is
read-only. Each is one warning or one error line naming it, and the commands answer.

Real processes: a download held mid-way in a ``pvmcache-async`` process of its own (stopped
with SIGSTOP while a record is planted, so its own writes cannot replace it), the command line
run as an operator runs it, files made as an operator makes them (truncate, ln -s, mkfifo).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvmcache_dev.glance import GlanceServer

from ..faultproxy import ThreadedFaultProxy, stall
from ..support import cli_args, cli_env, disk_image, run_cli, start_cli, vg_files, wait_for
from .test_progress import SIZE, Held, hold, wait_for_record

MiB = 1 << 20
MEMORY_LIMIT = 512 * MiB  # of the address space of a command under test: far above its need


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _ls(vg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``ls`` with its memory bounded; its time is bounded by the timeout alone."""
    return subprocess.run(
        cli_args(None, vg, "ls", *args),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        preexec_fn=_limited,
        check=False,
    )


@pytest.fixture
def held(glance_server: GlanceServer, tmp_path: Path) -> Iterator[Held]:
    yield from hold(glance_server, tmp_path, "--progress", "none", "--json")


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[str]) -> Iterator[None]:
    """The process stopped (SIGSTOP): it holds its locks and writes nothing meanwhile."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _record(held: Held) -> Path:
    return held.vg / ".pvmcache" / "progress" / f"{held.image_id}.json"


def _truncate_to_1g(path: Path) -> None:
    subprocess.run(["truncate", "-s", "1G", str(path)], check=True)


def _link_to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _nested(depth: int) -> Callable[[Path], None]:
    return lambda path: path.write_text("[" * depth + "]" * depth)


def _dated_1e300(path: Path) -> None:
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"started": 1e300}))


PLANTED = {
    "a 1 GB sparse file": (_truncate_to_1g, "larger than 4096 bytes"),
    "a link to /dev/zero": (_link_to_dev_zero, "a symbolic link"),
    "a FIFO": (_fifo, "a FIFO, not a regular file"),
    "a 200,000-deep JSON array": (_nested(200_000), "larger than 4096 bytes"),
    "a 2,000-deep JSON array": (_nested(2_000), "JSON nested deeper than 8 levels"),
    "a record dated 1e300": (_dated_1e300, "not a progress record (started is 1e+300)"),
}


@pytest.mark.parametrize("planted", PLANTED)
def test_ls_answers_at_once_with_one_warning_on_a_planted_progress_record(
    held: Held, planted: str
) -> None:
    plant, problem = PLANTED[planted]
    wait_for_record(held.vg, held.image_id)
    with stopped(held.proc):
        plant(_record(held))
        out = _ls(held.vg)
    assert out.returncode == 0, out.stderr
    [warning] = out.stderr.splitlines()
    assert f"progress record {_record(held)}: {problem}; ignored" in warning, warning
    [row] = [line for line in out.stdout.splitlines() if line.startswith(held.image_id)]
    assert "filling" in row and "(no progress recorded)" in row
    held.release()  # its writer replaces what was planted, then removes it
    assert vg_files(held.vg) and not _record(held).exists()


def _warned(stream: object, words: str) -> list[str]:
    """Lines of a process's stderr up to the first that holds ``words``."""
    assert hasattr(stream, "readline") and hasattr(stream, "fileno")
    lines: list[str] = []
    while not lines or words not in lines[-1]:
        ready, _, _ = select.select([stream], [], [], 60)
        assert ready, f"never told {words!r}: {lines}"
        line = stream.readline()
        assert line, f"ended without telling {words!r}: {lines}"
        lines.append(line)
    return lines


@pytest.mark.parametrize("depth", [200_000, 2_000])
def test_a_deploy_that_joins_exits_0_with_its_disk_whatever_the_record_it_watches(
    held: Held, depth: int
) -> None:
    wait_for_record(held.vg, held.image_id)
    instance = str(uuid.uuid4())
    args = ["deploy", held.image_id, "--instance", instance, "--progress", "json", "--json"]
    with stopped(held.proc):
        _nested(depth)(_record(held))
        joiner = start_cli(held.url, held.vg, *args)
        told = _warned(joiner.stderr, f"progress record {_record(held)}")  # it watched it
    held.release()
    stdout, stderr = joiner.communicate(timeout=60)
    assert joiner.returncode == 0, stderr
    row = json.loads(stdout)
    assert row["result"] == "joined"
    assert (held.vg / row["disk"]).read_bytes() == held.data
    assert sum("progress record" in line for line in told + stderr.splitlines()) == 1


# -- the progress directory ---------------------------------------------------------------------


def _link_before(vg: Path, elsewhere: Path) -> None:
    (vg / ".pvmcache").mkdir(parents=True)
    (vg / ".pvmcache" / "progress").symlink_to(elsewhere)


def _swap_midway(vg: Path, elsewhere: Path) -> None:
    progress = vg / ".pvmcache" / "progress"
    wait_for("the first record", lambda: any(progress.glob("*.json")))
    progress.rename(progress.with_name("progress.old"))
    progress.symlink_to(elsewhere)


@pytest.mark.parametrize("link", [_link_before, _swap_midway], ids=["planted", "swapped-in"])
def test_a_symlinked_progress_directory_gets_no_record_and_the_download_goes_on(
    glance_server: GlanceServer, tmp_path: Path, link: Callable[[Path, Path], None]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    vg = tmp_path / "vg"
    errors = tmp_path / "stderr"
    data = disk_image(SIZE, seed=82)
    img = glance_server.create_image(data)
    runner = ThreadedFaultProxy(glance_server.url)
    with runner as proxy, errors.open("w") as err:
        proxy.plan(img, stall(after=3 * MiB))
        if link is _link_before:
            link(vg, elsewhere)
        proc = subprocess.Popen(
            cli_args(proxy.url, vg, "prefetch", img, "--json"),
            stdout=subprocess.PIPE, stderr=err, text=True, env=cli_env(),
        )  # fmt: skip
        try:
            if link is _swap_midway:
                link(vg, elsewhere)
            wait_for(
                "a record written, or refused",
                lambda: any(elsewhere.iterdir()) or "not recorded" in errors.read_text(),
            )
            assert list(elsewhere.iterdir()) == []
            runner.release_stalls()
            stdout, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, errors.read_text()
    assert json.loads(stdout)["result"] == "miss"
    [warning] = errors.read_text().splitlines()
    assert "progress of downloads not recorded" in warning
    assert f"state directory {vg}/.pvmcache/progress is a symbolic link" in warning
    assert list(elsewhere.iterdir()) == []
    assert not any((vg / ".pvmcache").glob("progress.old/*"))  # its own record went too


def test_clearing_a_dead_writer_s_record_never_removes_files_through_a_linked_directory(
    held: Held, tmp_path: Path
) -> None:
    wait_for_record(held.vg, held.image_id)
    held.proc.send_signal(signal.SIGKILL)
    held.proc.wait(timeout=30)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victims = [elsewhere / f"{held.image_id}.json", elsewhere / f".{held.image_id}.1.tmp"]
    for victim in victims:
        victim.write_text("precious")
    progress = held.vg / ".pvmcache" / "progress"
    shutil.rmtree(progress)
    progress.symlink_to(elsewhere)

    out = _ls(held.vg, "--json")  # clears the dead writer's entry

    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    assert [v.read_text() for v in victims] == ["precious", "precious"]


# -- a read-only VG -----------------------------------------------------------------------------


@pytest.fixture
def read_only_vg(glance_server: GlanceServer, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A VG with one image cached, seen through a read-only bind mount; and the image."""
    vg, seen = tmp_path / "vg", tmp_path / "ro"
    img = glance_server.create_image(disk_image(MiB, seed=83))
    out = run_cli(glance_server.url, vg, "deploy", img, "--instance", str(uuid.uuid4()))
    assert out.returncode == 0, out.stderr
    seen.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(vg), str(seen)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a read-only VG here: {mounted.stderr.strip()}")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(seen)]
        subprocess.run(remount, capture_output=True, text=True, check=True)
        yield seen, img
    finally:
        if subprocess.run(["umount", str(seen)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(seen)], check=False)


@pytest.mark.parametrize("state", ["as-left", "no-lock-dirs", "index-open-elsewhere"])
def test_ls_works_on_a_read_only_vg(
    read_only_vg: tuple[Path, str], tmp_path: Path, state: str
) -> None:
    vg, img = read_only_vg
    writable = tmp_path / "vg" / ".pvmcache"
    if state == "no-lock-dirs":  # removed through the writable path, as an operator might
        shutil.rmtree(writable / "locks")
        shutil.rmtree(writable / "owners", ignore_errors=True)  # a file VG makes none now
    with contextlib.ExitStack() as using:
        if state == "index-open-elsewhere":  # a process of the writable side: its WAL is there
            other = using.enter_context(
                contextlib.closing(sqlite3.connect(writable / "index.sqlite"))
            )
            other.execute("SELECT count(*) FROM images").fetchall()
        # with no shared-memory file left and none to be made, the index is read immutable
        assert (writable / "index.sqlite-shm").exists() == (state == "index-open-elsewhere")
        rows = _ls(vg, "--json")
        text = _ls(vg)

    assert rows.returncode == 0 and text.returncode == 0, rows.stderr + text.stderr
    assert [(r["image_id"], r["state"]) for r in json.loads(rows.stdout)] == [(img, "ready")]
    assert img in text.stdout and rows.stderr == text.stderr == ""


@pytest.mark.parametrize("command", ["deploy", "prefetch", "prefetch-new", "prune"])
def test_every_command_that_must_write_says_the_vg_is_read_only(
    glance_server: GlanceServer, read_only_vg: tuple[Path, str], command: str
) -> None:
    vg, img = read_only_vg
    args = {
        "deploy": ["deploy", img, "--instance", str(uuid.uuid4())],
        "prefetch": ["prefetch", img],  # a hit, whose use must be recorded
        "prefetch-new": ["prefetch", glance_server.create_image(disk_image(MiB, seed=84))],
        "prune": ["prune", "--min-age", "0"],
    }[command]

    out = run_cli(glance_server.url, vg, *args)

    assert out.returncode == 1, out.stdout
    [line] = out.stderr.splitlines()  # one line, no traceback
    assert "read-only" in line
