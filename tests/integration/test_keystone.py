"""Keystone on the command line, as an operator uses it: clouds.yaml or the OS_* variables, a
real Keystone, and the real Glance in its keystone flavor found through the catalog."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import yarl

from pvmcache_dev.glance import GlanceServer
from pvmcache_dev.keystone import Credentials

from ..conftest import TOKEN_SECONDS
from ..faultproxy import ThreadedFaultProxy, stall
from ..support import disk_image, vg_files, wait_for

MiB = 1 << 20


def run(
    *args: str, vg: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The command line as an operator's shell runs it: only ``env`` of PVMCACHE_/OS_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    return subprocess.run(
        [sys.executable, "-m", "pvmcache_async", "--vg", f"file:{vg}", *args],
        capture_output=True,
        text=True,
        env=clean | env,
        timeout=timeout,
        check=False,
    )


def clouds_yaml(tmp_path: Path, creds: Credentials) -> dict[str, str]:
    path = tmp_path / "clouds.yaml"
    path.write_text(creds.clouds_yaml("devstack"))
    return {"OS_CLIENT_CONFIG_FILE": str(path)}


def test_clouds_yaml_finds_glance_in_the_catalog(
    keystone_glance: GlanceServer, operator: Credentials, tmp_path: Path
) -> None:
    data = disk_image(2 * MiB, seed=70)
    img = keystone_glance.create_image(data)
    vg = tmp_path / "vg"
    env = clouds_yaml(tmp_path, operator)  # no Glance URL: the catalog has it
    out = run("--debug", "--os-cloud", "devstack", "prefetch", img, "--json", vg=vg, env=env)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["result"] == "miss"
    assert (vg / row["cache_disk"]).read_bytes() == data
    # even the debug log holds neither the password nor a (fernet) token
    assert operator.password not in out.stdout + out.stderr
    assert "gAAAAA" not in out.stdout + out.stderr


def test_os_variables_authenticate_like_clouds_yaml(
    keystone_glance: GlanceServer, operator: Credentials, tmp_path: Path
) -> None:
    img = keystone_glance.create_image(disk_image(MiB, seed=71))
    out = run("prefetch", img, "--json", vg=tmp_path, env=operator.os_environ())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"] == "miss"


def test_without_credentials_glance_refuses_and_says_so(
    keystone_glance: GlanceServer, tmp_path: Path
) -> None:
    # the catalog's Glance checks tokens: no keystone options, no token, no image
    img = keystone_glance.create_image(disk_image(MiB, seed=72))
    out = run("--glance-url", keystone_glance.url, "prefetch", img, vg=tmp_path, env={})
    assert out.returncode == 1
    assert "HTTP 401" in out.stderr and out.stderr.count("\n") == 1


def test_a_wrong_password_is_one_line_that_never_shows_it(
    keystone_glance: GlanceServer, operator: Credentials, tmp_path: Path
) -> None:
    wrong = "not-" + operator.password
    env = operator.os_environ() | {"OS_PASSWORD": wrong}
    img = keystone_glance.create_image(disk_image(MiB, seed=73))
    out = run("--debug", "prefetch", img, vg=tmp_path, env=env)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "refused the credentials (HTTP 401)" in last and "'operator'" in last
    assert wrong not in out.stdout + out.stderr
    quiet = run("prefetch", img, vg=tmp_path, env=env)
    assert quiet.stderr.count("\n") == 1 and "refused the credentials" in quiet.stderr
    assert vg_files(tmp_path) == []


def test_an_unknown_region_names_what_the_catalog_lacks(
    keystone_glance: GlanceServer, operator: Credentials, tmp_path: Path
) -> None:
    img = keystone_glance.create_image(disk_image(MiB, seed=74))
    env = operator.os_environ(region="RegionTwo")
    out = run("prefetch", img, vg=tmp_path, env=env)
    assert out.returncode == 1
    assert "no image (Glance) endpoint" in out.stderr and "'RegionTwo'" in out.stderr
    assert out.stderr.count("\n") == 1


def token_expired(auth_url: str, token: str) -> bool:
    """Whether Keystone refuses ``token`` now (it validates itself while it is valid)."""
    base = yarl.URL(auth_url)
    conn = http.client.HTTPConnection(base.host or "", base.port, timeout=30)
    try:
        headers = {"X-Auth-Token": token, "X-Subject-Token": token}
        conn.request("GET", f"{base.path}/auth/tokens", headers=headers)
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status in (200, 401, 404), f"keystone answered HTTP {status} to a validation"
    return status != 200


def test_a_token_that_expires_mid_download_is_renewed_for_the_resume(
    keystone_glance: GlanceServer, operator: Credentials, tmp_path: Path
) -> None:
    data = disk_image(6 * MiB, seed=75)
    img = keystone_glance.create_image(data)
    vg = tmp_path / "vg"
    runner = ThreadedFaultProxy(keystone_glance.url)
    with runner as proxy:
        # the body stops after 3 MiB and is held until the first token has expired; then the
        # connection drops, and the resume needs a token issued after the first
        proxy.plan(img, stall(after=3 * MiB))
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
        cli = subprocess.Popen(
            [
                sys.executable, "-m", "pvmcache_async", "--vg", f"file:{vg}",
                "--os-cloud", "devstack", "--glance-url", proxy.url, "prefetch", img, "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean | clouds_yaml(tmp_path, operator),
        )  # fmt: skip
        try:
            wait_for("the stall", proxy.stalled.is_set, timeout=120)
            first = proxy.file_gets(img)[0].headers["x-auth-token"]
            wait_for(
                "the first token to expire",
                lambda: token_expired(operator.auth_url, first),
                timeout=TOKEN_SECONDS + 60,
            )
            runner.drop_stalls()
            out, err = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    assert cli.returncode == 0, err
    gets = proxy.file_gets(img)
    assert [g.status for g in gets] == [200, 206]
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")
    assert gets[1].headers["x-auth-token"] != first  # renewed: Glance took the new one
    assert (vg / json.loads(out)["cache_disk"]).read_bytes() == data


def test_ls_and_prune_never_ask_keystone(tmp_path: Path) -> None:
    # a cloud whose keystone does not even listen: listing and pruning the VG still work
    nowhere = Credentials("http://127.0.0.1:9/v3", "operator", "secret", "demo")
    for args in (["ls", "--json"], ["prune", "--json"]):
        out = run(*args, vg=tmp_path, env=nowhere.os_environ())
        assert out.returncode == 0, out.stderr
