"""The command-line contract, driven as operators and outside checks drive it: subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pvmcache_async.devglance import GlanceServer

from .support import disk_image, vg_files

MiB = 1 << 20


def cli(
    *args: str, vg: Path, glance: GlanceServer | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    glance_args = ["--glance-url", glance.url] if glance else []
    return subprocess.run(
        [sys.executable, "-m", "pvmcache_async", *glance_args, "--vg", f"file:{vg}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_deploy_json_reports_each_instance(glance_server: GlanceServer, tmp_path: Path) -> None:
    data = disk_image(MiB, seed=30)
    img = glance_server.create_image(data)
    insts = [str(uuid.uuid4()) for _ in range(3)]
    args = ["deploy", img, *(a for i in insts for a in ("--instance", i)), "--json"]
    out = cli(*args, vg=tmp_path, glance=glance_server)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["instance"] for r in rows) == sorted(insts)
    results = [r["result"] for r in rows]
    # one download; the others waited on it ("joined") or, if they came after, found it ("hit")
    assert results.count("miss") == 1 and set(results) <= {"miss", "joined", "hit"}
    assert glance_server.file_requests(img) == 1
    keys = {"image_id", "instance", "disk", "cache_disk", "result", "bytes_fetched", "seconds"}
    for r in rows:
        assert set(r) == keys
        assert (tmp_path / r["disk"]).read_bytes() == data
    assert sum(r["bytes_fetched"] for r in rows) == len(data)


def test_deploy_processes_racing_on_one_vg_download_once(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(8 * MiB, seed=31)
    img = glance_server.create_image(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pvmcache_async",
                "--glance-url",
                glance_server.url,
                "--vg",
                f"file:{tmp_path}",
                "deploy",
                img,
                "--instance",
                str(uuid.uuid4()),
                "--instance",
                str(uuid.uuid4()),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(6)
    ]
    rows = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        rows += [json.loads(line) for line in stdout.splitlines()]
    assert glance_server.file_requests(img) == 1
    assert [r["result"] for r in rows].count("miss") == 1
    assert len(rows) == 12
    for r in rows:
        assert (tmp_path / r["disk"]).read_bytes() == data


def test_prefetch_ls_and_prune_follow_the_contract(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    a = glance_server.create_image(disk_image(MiB, seed=32))
    b = glance_server.create_image(disk_image(2 * MiB, seed=33))
    out = cli("prefetch", a, b, "--json", vg=tmp_path, glance=glance_server)
    assert out.returncode == 0, out.stderr
    rows = {json.loads(line)["image_id"]: json.loads(line) for line in out.stdout.splitlines()}
    assert {r["result"] for r in rows.values()} == {"miss"}
    assert set(rows[a]) == {"image_id", "cache_disk", "result", "bytes_fetched", "seconds"}

    again = cli("prefetch", a, "--json", vg=tmp_path, glance=glance_server)
    assert json.loads(again.stdout)["result"] == "hit"

    listing = json.loads(cli("ls", "--json", vg=tmp_path).stdout)
    assert {e["image_id"] for e in listing} == {a, b}
    for e in listing:
        assert set(e) == {"image_id", "cache_disk", "size", "state", "created", "last_used"}
        assert e["state"] == "ready"
    instance_disk = tmp_path / "b_keepme"
    instance_disk.write_bytes(b"an instance's data")

    kept = json.loads(cli("prune", "--in-use", a, "--min-age", "0", "--json", vg=tmp_path).stdout)
    assert kept == {"removed": [rows[b]["cache_disk"]], "kept": [rows[a]["cache_disk"]]}
    assert instance_disk.read_bytes() == b"an instance's data"
    assert vg_files(tmp_path) == sorted([rows[a]["cache_disk"], "b_keepme"])


def test_prune_keeps_young_images_and_disks_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "i_foreign000000").write_bytes(b"not ours")
    out = cli("prune", "--min-age", "0", "--json", vg=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"removed": [], "kept": []}
    assert (tmp_path / "i_foreign000000").exists()


@pytest.mark.parametrize(
    "image_id, needs_glance, words",
    [
        ("../../etc/passwd", False, "is not a uuid"),
        ("3e865d14-8c1e-4c6d-9a1e", False, "is not a uuid"),
        (str(uuid.uuid4()), True, "not found in Glance"),
    ],
)
def test_bad_input_gets_one_line_and_a_failing_status(
    glance_server: GlanceServer, tmp_path: Path, image_id: str, needs_glance: bool, words: str
) -> None:
    out = cli(
        "deploy", image_id, "--instance", str(uuid.uuid4()), vg=tmp_path, glance=glance_server
    )
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in out.stderr
    if needs_glance:
        assert image_id in lines[0]
    assert vg_files(tmp_path) == []


def test_non_raw_and_empty_images_are_refused_by_name(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    qcow = glance_server.create_image(b"not raw " * 512, disk_format="qcow2")
    queued = glance_server.create_image(None)
    for img, words in ((qcow, "only 'raw'"), (queued, "'queued'")):
        out = cli("prefetch", img, vg=tmp_path, glance=glance_server)
        assert out.returncode == 1
        assert out.stderr.count("\n") == 1 and img in out.stderr and words in out.stderr
    assert vg_files(tmp_path) == []


def test_the_token_never_reaches_output_or_logs(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    secret = "tok-" + uuid.uuid4().hex
    out = cli(
        "--token",
        secret,
        "--debug",
        "prefetch",
        str(uuid.uuid4()),
        vg=tmp_path,
        glance=glance_server,
    )
    assert out.returncode != 0
    assert secret not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["deploy", "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00"], "--instance"),
        (["frobnicate"], "invalid choice"),
        (["prune", "--max-bytes", "lots"], "--max-bytes"),
    ],
)
def test_usage_errors_are_one_line_too(tmp_path: Path, args: list[str], words: str) -> None:
    out = cli(*args, vg=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert vg_files(tmp_path) == []
