"""The command-line contract, driven as operators and outside checks drive it: subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pvmcache_dev.glance import GlanceServer

from ..support import disk_image, vg_files

MiB = 1 << 20


def cli(
    *args: str, vg: Path, glance: GlanceServer | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))},
        **(env or {}),
    }
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


IMG = "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00"
INST = "5d0e6a4f-2b1c-4e8d-9f3a-1c2b3d4e5f60"
LONG = "a" * 10_000
GLANCE = ["--glance-url", "https://127.0.0.1:9"]  # nothing listens: none of these gets there


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--read-timeout", "nan", "ls"], {}, "--read-timeout: 'nan' is not a finite number"),
        (["--read-timeout", "inf", "ls"], {}, "--read-timeout: 'inf' is not a finite number"),
        (["--read-timeout", "-1", "ls"], {}, "--read-timeout: '-1' is not a finite number"),
        (["--read-timeout", "0", "ls"], {}, "seconds above 0"),
        (["ls"], {"PVMCACHE_READ_TIMEOUT": "nan"}, "PVMCACHE_READ_TIMEOUT: 'nan' is not"),
        (["ls"], {"PVMCACHE_RETRIES": "-2"}, "PVMCACHE_RETRIES: '-2' is not a whole number"),
        (["--retries", "-1", "ls"], {}, "--retries: '-1' is not a whole number >= 1"),
        (["--retries", "0", "ls"], {}, "--retries: '0' is not a whole number >= 1"),
        (["--max-downloads", "0", "ls"], {}, "--max-downloads: '0' is not a whole number >= 1"),
        (["prune", "--min-age", "nan"], {}, "--min-age: 'nan' is not a finite number"),
        (["prune", "--max-count", "-1"], {}, "--max-count: '-1' is not a whole number >= 0"),
        (
            [*GLANCE, "--ca-file", "/nonexistent/ca.pem", "prefetch", IMG],
            {},
            "CA file '/nonexistent/ca.pem' cannot be read (No such file",
        ),
        (
            [*GLANCE, "--ca-file", "/", "prefetch", IMG],
            {},
            "CA file '/' cannot be read (Is a directory)",
        ),
        (
            [*GLANCE, "--ca-file", "/etc/hostname", "prefetch", IMG],
            {},
            "holds no usable certificate",
        ),
        (
            ["--glance-url", f"http://127.0.0.1/{LONG}", "prefetch", IMG],
            {},
            "Glance URL is 10017 characters long; at most 2048",
        ),
        (
            ["--glance-url", f"http://{'h' * 300}", "prefetch", IMG],
            {},
            "not have a valid host name",
        ),
        (["--glance-url", f"http://{'h' * 64}.example", "prefetch", IMG], {}, "valid host name"),
        (
            ["--glance-url", "http://[::1", "prefetch", IMG],
            {},
            "is not a valid URL (Invalid IPv6 URL)",
        ),
        (
            ["--glance-url", "http://127.0.0.1:9/?x=1", "prefetch", IMG],
            {},
            "has a query or fragment",
        ),
        (
            ["--glance-url", "http://glance host", "prefetch", IMG],
            {},
            "does not have a valid host name",
        ),
        (
            ["--vg", "file:~nosuchuser4242/vg", "ls"],
            {},
            "~nosuchuser4242 is no user's home directory",
        ),
        (["--vg", f"file:/tmp/{LONG}", "ls"], {}, "longer than the system's limit"),
        (["--vg", f"nfs:{LONG}", "ls"], {}, "is not 'file:PATH' or 'powervm:...'"),
        (["prefetch", LONG], {}, "IMAGE_ID: 'aaaa"),
        (["deploy", IMG, "--instance", LONG], {}, "--instance: 'aaaa"),
        (
            ["deploy", IMG, "--instance", INST, "--instance", INST.upper()],
            {},
            f"instance {INST} is given more than once",
        ),
        (
            ["deploy", IMG, "--instance", INST, "--instance", INST[:-1] + "1"],
            {},
            "would both get disk b_5d0e6a4f_2b1c",
        ),
    ],
)
def test_hostile_input_gets_one_short_line_naming_what_was_wrong(
    tmp_path: Path, args: list[str], env: dict[str, str], words: str
) -> None:
    vg = tmp_path / "vg"
    out = cli(*args, vg=vg, env=env)  # a --vg in args comes later, and wins
    assert out.returncode in (1, 2), out.stderr
    assert out.stdout == ""
    [line] = out.stderr.splitlines()
    assert words in line
    assert "unexpected error" not in line and len(line) < 400
    assert not vg.exists() or vg_files(vg) == []


def _closed_pipe() -> int:
    """The write end of a pipe whose reader has gone: every write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("where", ["full disk", "closed pipe"])
def test_output_that_cannot_be_written_is_one_line_and_a_failing_status(
    tmp_path: Path, where: str
) -> None:
    stdout = os.open("/dev/full", os.O_WRONLY) if where == "full disk" else _closed_pipe()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pvmcache_async", "--vg", f"file:{tmp_path}", "ls"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(stdout)
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    assert line.startswith("pvmcache-async: writing the results to stdout failed ("), line


@pytest.mark.parametrize("where", ["full disk", "closed pipe"])
def test_a_deploy_whose_progress_cannot_be_shown_exits_0_with_its_disk(
    glance_server: GlanceServer, tmp_path: Path, where: str
) -> None:
    data = disk_image(MiB, seed=39)
    img = glance_server.create_image(data)
    stderr = os.open("/dev/full", os.O_WRONLY) if where == "full disk" else _closed_pipe()
    args = ["deploy", img, "--instance", str(uuid.uuid4()), "--progress", "json", "--json"]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pvmcache_async", "--glance-url", glance_server.url,
             "--vg", f"file:{tmp_path}", *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(stderr)
    assert out.returncode == 0  # the disk was made: what shows its progress cannot fail it
    row = json.loads(out.stdout)
    assert row["result"] == "miss" and (tmp_path / row["disk"]).read_bytes() == data


@pytest.mark.parametrize(
    "spec, words",
    [
        ("bogus", "VG 'bogus' is not 'file:PATH' or 'powervm:...'"),
        ("file:", "VG 'file:' is not 'file:PATH' or 'powervm:...'"),
        ("powervm:nonsense", "VG powervm: 'nonsense' is not one of"),
        ("powervm:", "VG powervm: vg=NAME (the volume group) is required"),
        ("powervm:vg=a,vg=b", "VG powervm: vg is given twice"),
        ("file:~nosuchuser4242/vg", "~nosuchuser4242 is no user's home directory"),
    ],
)
@pytest.mark.parametrize("where", ["option", "env"])
@pytest.mark.parametrize("command", [["ls"], ["prune"], ["deploy", IMG, "--instance", INST]])
def test_a_malformed_vg_is_a_usage_error_naming_the_spec(
    tmp_path: Path, spec: str, words: str, where: str, command: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    args = [*GLANCE, *(["--vg", spec] if where == "option" else []), *command]
    if where == "env":
        env["PVMCACHE_VG"] = spec
    env["HOME"] = str(tmp_path)  # were a default VG made, it would be here
    out = subprocess.run(
        [sys.executable, "-m", "pvmcache_async", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    [line] = out.stderr.splitlines()
    named = "argument --vg: " if where == "option" else "PVMCACHE_VG: "
    assert line.startswith(f"pvmcache-async: error: {named}") and words in line, line
    assert list(tmp_path.iterdir()) == []  # nothing made, not even a default VG
