"""SIGINT and SIGTERM to the command line: the deploys under way are cancelled and undone
before it exits (130 and 143, one line), so the same instances can be deployed again at once.

Real child processes, real signals. Each signal is sent at an observable moment, never after
a guessed sleep: mid-download once the fault proxy holds the body and the partial disk exists;
mid-clone once the child's clones have begun (they are held in their threads until the test
lets them go, after the child has logged that it received the signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from pvmcache_async.names import PARTIAL_PREFIX
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import ThreadedFaultProxy, stall
from ..support import disk_image, vg_files

MiB = 1 << 20
SIGNALS = [signal.SIGINT, signal.SIGTERM]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}


def _cli(url: str | None, vg: Path, *args: str) -> list[str]:
    glance = ["--glance-url", url] if url else []
    return [*glance, "--vg", f"file:{vg}", *args]


def _run(url: str | None, vg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvmcache_async", *_cli(url, vg, *args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )


def _start(argv: list[str], stderr: int | IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env()
    )


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _assert_nothing_left(vg: Path, keep: list[str]) -> None:
    assert vg_files(vg) == sorted(keep)  # no p_, t_ or b_ disk
    ls = _run(None, vg, "ls", "--json")
    assert [e["cache_disk"] for e in json.loads(ls.stdout)] == keep  # no "filling" entry
    locks = {p.name for p in (vg / ".pvmcache" / "locks").iterdir()}
    assert len(locks) <= 2 * len(keep)  # a cached image's .lock and .use at most


@pytest.mark.parametrize("command", ["deploy", "prefetch"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_mid_download_discards_the_download_and_exits_with_its_status(
    glance_server: GlanceServer, tmp_path: Path, signum: signal.Signals, command: str
) -> None:
    data = disk_image(4 * MiB, seed=80)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    insts = [str(uuid.uuid4()) for _ in range(2)]
    deploy = ["deploy", img, *(a for i in insts for a in ("--instance", i)), "--json"]
    if command == "prefetch":
        deploy = ["prefetch", img, "--json"]
    with ThreadedFaultProxy(glance_server.url) as proxy:
        proxy.plan(img, stall(after=MiB + 4321))
        child = _start(["-m", "pvmcache_async", *_cli(proxy.url, vg, *deploy)], subprocess.PIPE)
        try:
            # the partial's name is its writer's own (random): any p_ file is this download's
            _wait_for(
                "the held download",
                lambda: proxy.stalled.is_set() and any(vg.glob(f"{PARTIAL_PREFIX}*")),
            )
            child.send_signal(signum)
            stdout, stderr = child.communicate(timeout=60)
        finally:
            child.kill()

    assert child.returncode == EXIT[signum], stderr
    assert stdout == ""
    [line] = stderr.splitlines()
    assert line == (
        f"pvmcache-async: interrupted by {signum.name}; the work under way was cancelled and undone"
    )
    _assert_nothing_left(vg, keep=[])

    again = _run(glance_server.url, vg, *deploy)  # the same instances, at once
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["result"] for r in rows].count("miss") == 1  # downloaded afresh, once
    assert sum(r["bytes_fetched"] for r in rows) == len(data)
    for r in rows if command == "deploy" else []:
        assert (vg / r["disk"]).read_bytes() == data
    assert {r.get("instance") for r in rows} == (set(insts) if command == "deploy" else {None})


_HELD_CLONES = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from pvmcache_async.cli import main as cli
    from pvmcache_async.storage.filevg import FileVG

    marks = Path(sys.argv[1])
    real_clone = FileVG.clone

    def wait_for_go():
        while not (marks / "go").exists():
            time.sleep(0.01)

    async def held_clone(self, source, target, size=None):
        (marks / f"cloning-{target}").touch()
        await asyncio.to_thread(wait_for_go)  # a thread: cancelling its caller cannot stop it
        await real_clone(self, source, target, size)

    FileVG.clone = held_clone
    sys.exit(cli.main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_mid_clone_waits_for_the_clones_then_undoes_them(
    glance_server: GlanceServer, tmp_path: Path, signum: signal.Signals
) -> None:
    data = disk_image(2 * MiB, seed=81)
    img = glance_server.create_image(data)
    vg, marks = tmp_path / "vg", tmp_path / "marks"
    marks.mkdir()
    cached = _run(glance_server.url, vg, "prefetch", img, "--json")  # so the deploys clone
    assert cached.returncode == 0, cached.stderr
    cache_disk = json.loads(cached.stdout)["cache_disk"]
    insts = [str(uuid.uuid4()) for _ in range(3)]
    deploy = ["deploy", img, *(a for i in insts for a in ("--instance", i)), "--json"]
    log = tmp_path / "stderr"
    with log.open("w") as err:
        child = _start(["-c", _HELD_CLONES, str(marks), "--debug", *_cli(None, vg, *deploy)], err)
    try:
        _wait_for("the clones", lambda: len(list(marks.glob("cloning-*"))) == len(insts))
        child.send_signal(signum)
        _wait_for("the signal", lambda: f"{signum.name}: cancelling 3" in log.read_text())
        child.send_signal(signum)  # a second one does not cut the clean-up short
        _wait_for("the second", lambda: "still waiting for the clean-up" in log.read_text())
        (marks / "go").touch()  # the clones end, and are then undone
        stdout, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    stderr = log.read_text()

    assert child.returncode == EXIT[signum], stderr
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"pvmcache-async: interrupted by {signum.name}; the work under way was cancelled and undone"
    )
    _assert_nothing_left(vg, keep=[cache_disk])

    again = _run(None, vg, *deploy)  # the same instances, at once: no "already has a disk"
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["result"] for r in rows] == ["hit"] * len(insts)
    for r in rows:
        assert (vg / r["disk"]).read_bytes() == data
