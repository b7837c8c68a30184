"""SIGKILL mid-download and mid-clone: nothing partial under a real name, and the next process
that touches the image cleans up, without ever removing what a live process is still doing.

The kills are deterministic: a download is held mid-way by the fault proxy's stall (the
process is killed once the proxy has sent part of the body and the partial disk exists), and a
clone is held by a helper process that owns a clone temporary exactly as ``FileVG.clone`` does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from pvmcache_async.names import CLONE_PREFIX, PARTIAL_PREFIX
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import ThreadedFaultProxy, stall
from ..support import cli_env, disk_image, run_cli, start_cli, vg_files, wait_for

MiB = 1 << 20


def _partials(vg: Path) -> list[str]:
    return [n for n in vg_files(vg) if n.startswith(PARTIAL_PREFIX)] if vg.is_dir() else []


def _ls(vg: Path) -> list[dict[str, object]]:
    out = run_cli(None, vg, "ls", "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def test_a_deploy_killed_mid_download_is_cleaned_up_by_the_next_deploy(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(4 * MiB, seed=60)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    with ThreadedFaultProxy(glance_server.url) as proxy:
        proxy.plan(img, stall(after=3 * MiB // 2))
        victim = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()))
        wait_for("the stall", lambda: proxy.stalled.is_set() and bool(_partials(vg)))
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)

    # nothing under an i_ or instance disk name: the partial download, and the victim's own
    # disk that the download was writing alongside, under a temporary t_ name
    left = vg_files(vg)
    [partial] = _partials(vg)
    assert len(left) == 2 and partial in left, left
    assert next(n for n in left if n != partial).startswith(CLONE_PREFIX)

    inst = str(uuid.uuid4())
    again = run_cli(glance_server.url, vg, "deploy", img, "--instance", inst, "--json")

    assert again.returncode == 0, again.stderr
    row = json.loads(again.stdout)
    assert row["result"] == "miss" and row["bytes_fetched"] == len(data)
    assert sorted(vg_files(vg)) == sorted([row["cache_disk"], row["disk"]])  # partial gone
    assert hashlib.sha256((vg / row["disk"]).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [r["state"] for r in _ls(vg)] == ["ready"]


def test_ls_never_shows_a_killed_download_as_filling_and_clears_it(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(4 * MiB, seed=63))
    vg = tmp_path / "vg"
    with ThreadedFaultProxy(glance_server.url) as proxy:
        proxy.plan(img, stall(after=MiB))
        victim = start_cli(proxy.url, vg, "prefetch", img)
        wait_for("the stall", lambda: proxy.stalled.is_set() and bool(_partials(vg)))
        assert [row["state"] for row in _ls(vg)] == ["filling"]  # alive: a live download
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)

    assert _ls(vg) == []  # dead: not a download, and what it left is gone
    assert vg_files(vg) == []


def test_a_stalled_download_of_a_live_process_survives_a_prune_and_finishes(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(4 * MiB, seed=61)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    runner = ThreadedFaultProxy(glance_server.url)
    with runner as proxy:
        proxy.plan(img, stall(after=MiB))
        first = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()), "--json")
        wait_for("the stall", lambda: proxy.stalled.is_set() and bool(_partials(vg)))
        [partial] = _partials(vg)
        second = start_cli(proxy.url, vg, "deploy", img, "--instance", str(uuid.uuid4()), "--json")

        pruned = run_cli(None, vg, "prune", "--min-age", "0", "--json")

        assert pruned.returncode == 0, pruned.stderr
        assert json.loads(pruned.stdout) == {"removed": [], "kept": []}
        assert _partials(vg) == [partial] and first.poll() is None  # the live one left alone
        runner.release_stalls()
        outs = [p.communicate(timeout=60) for p in (first, second)]
        assert [p.returncode for p in (first, second)] == [0, 0], outs
        assert len(proxy.file_gets(img)) == 1  # one download for both processes

    rows = [json.loads(out) for out, _ in outs]
    # the second waited on the lock (joined), or reached it only once the first was done (hit)
    assert rows[0]["result"] == "miss" and rows[1]["result"] in ("joined", "hit")
    for r in rows:
        assert (vg / r["disk"]).read_bytes() == data
    assert _partials(vg) == []


_CLONE_HELPER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from pvmcache_async.storage.filevg import FileVG
    from pvmcache_async.storage.fileio import create_owned

    vg = FileVG(Path(sys.argv[1]))
    tmp = vg.path_of("t_0123456789abc")
    fd = create_owned(tmp, 0o600)  # what FileVG.clone does before it copies; held till killed
    os.write(fd, b"half a clone" * 1000)
    print("cloning", flush=True)
    time.sleep(600)
    """
)


def _clone_in_progress(vg: Path) -> subprocess.Popen[str]:
    helper = subprocess.Popen(
        [sys.executable, "-c", _CLONE_HELPER, str(vg)],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert helper.stdout is not None
    assert helper.stdout.readline().strip() == "cloning"
    return helper


def test_a_clone_killed_mid_copy_is_removed_by_the_next_deploy(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=62)
    img = glance_server.create_image(data)
    vg = tmp_path / "vg"
    helper = _clone_in_progress(vg)
    helper.send_signal(signal.SIGKILL)
    helper.wait(timeout=30)
    assert vg_files(vg) == ["t_0123456789abc"]  # never under the instance disk's name

    inst = str(uuid.uuid4())
    out = run_cli(glance_server.url, vg, "deploy", img, "--instance", inst, "--json")

    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert sorted(vg_files(vg)) == sorted([row["cache_disk"], row["disk"]])
    assert (vg / row["disk"]).read_bytes() == data


def test_a_clone_still_running_in_another_process_is_left_alone(tmp_path: Path) -> None:
    vg = tmp_path / "vg"
    helper = _clone_in_progress(vg)
    try:
        shutil.rmtree(vg / ".pvmcache")  # its writer's hold is on the file: nothing to rm
        out = run_cli(None, vg, "prune", "--min-age", "0")
        assert out.returncode == 0, out.stderr
        assert vg_files(vg) == ["t_0123456789abc"]
    finally:
        helper.send_signal(signal.SIGKILL)
        helper.wait(timeout=30)
    out = run_cli(None, vg, "prune", "--min-age", "0")  # now its owner is dead
    assert out.returncode == 0, out.stderr
    assert vg_files(vg) == []
