"""Secrets stay where they belong: no password or token in a message or a log, and no token
at any origin other than the configured Glance endpoint, whatever a redirect says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvmcache_async import GlanceClient, GlanceError, ImageCache, InvalidInput
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.glance.urls import redact_url
from pvmcache_async.storage.filevg import FileVG
from pvmcache_dev.glance import GlanceServer
from pvmcache_dev.keystone import Credentials, KeystoneServer

from ..faultproxy import FaultProxy, redirect
from ..support import disk_image, vg_files

MiB = 1 << 20
TOKEN = "tok-" + uuid.uuid4().hex
SERVICE_TOKEN = "svc-" + uuid.uuid4().hex
PASSWORD = "pw-" + uuid.uuid4().hex
FAST = RetryPolicy(retries=2, backoff=0.01, max_backoff=0.05)


@pytest.fixture
async def proxy(glance_server: GlanceServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(glance_server.url) as p:
        yield p


@pytest.fixture
async def elsewhere(glance_server: GlanceServer) -> AsyncIterator[FaultProxy]:
    """Another origin (another port on loopback) that would serve the image, and records
    every request that reaches it."""
    async with FaultProxy(glance_server.url) as p:
        yield p


def _cache(url: str, root: Path) -> ImageCache:
    client = GlanceClient(url, token=TOKEN, service_token=SERVICE_TOKEN, retry=FAST)
    return ImageCache(FileVG(root), client)


@pytest.mark.parametrize("what", ["record", "file"])
@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("userinfo", [False, True], ids=["plain", "userinfo"])
async def test_a_redirect_to_another_origin_is_refused_and_no_token_reaches_it(
    proxy: FaultProxy,
    elsewhere: FaultProxy,
    glance_server: GlanceServer,
    tmp_path: Path,
    what: str,
    status: int,
    userinfo: bool,
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=70))
    target = elsewhere.url.replace("//", f"//admin:{PASSWORD}@") if userinfo else elsewhere.url
    path = f"/v2/images/{img}" + ("/file" if what == "file" else "")
    proxy.plan(img, redirect(target + path, status), what=what)
    cache = _cache(proxy.url, tmp_path / "vg")
    try:
        with pytest.raises(GlanceError) as err:
            await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()

    assert elsewhere.seen == []  # not followed: neither token went there
    message = str(err.value)
    assert message.startswith(f"image {img}: Glance redirected the image ")
    assert f"to {elsewhere.url}, another origin" in message
    for secret in (TOKEN, SERVICE_TOKEN, PASSWORD, "admin"):
        assert secret not in message
    assert len([s for s in proxy.seen if s.fault is not None]) == 1  # a refusal is final
    assert vg_files(tmp_path / "vg") == []


async def test_a_redirect_within_the_endpoint_is_followed_with_the_tokens(
    proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = disk_image(MiB, seed=71)
    img = glance_server.create_image(data)
    proxy.plan(img, redirect(f"/v2/images/{img}", 307), what="record")  # relative
    proxy.plan(img, redirect(f"{proxy.url}/v2/images/{img}/file", 302))  # absolute
    cache = _cache(proxy.url, tmp_path / "vg")
    try:
        result = await cache.deploy(img, str(uuid.uuid4()))
    finally:
        await cache.close()

    assert (tmp_path / "vg" / result.disk).read_bytes() == data
    assert [s.status for s in proxy.file_gets(img)] == [302, 200]
    for seen in proxy.seen:
        assert seen.headers["x-auth-token"] == TOKEN
        assert seen.headers["x-service-token"] == SERVICE_TOKEN


async def test_a_redirect_loop_ends_in_a_clear_error(
    proxy: FaultProxy, glance_server: GlanceServer, tmp_path: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=72))
    proxy.plan(img, *[redirect(f"/v2/images/{img}")] * 10, what="record")
    cache = _cache(proxy.url, tmp_path / "vg")
    try:
        with pytest.raises(GlanceError, match=f"image {img}: .* redirected .* more than 5 times"):
            await cache.ensure(img)
    finally:
        await cache.close()
    assert len(proxy.seen) == 6


@pytest.mark.parametrize(
    "url",
    [
        f"http://admin:{PASSWORD}@127.0.0.1:9292",
        f"http://:{PASSWORD}@127.0.0.1:9292/image",
        f"https://{PASSWORD}@127.0.0.1",
    ],
)
def test_an_endpoint_with_userinfo_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(InvalidInput, match="has a user name or password in it") as err:
        GlanceClient(url)
    assert PASSWORD not in str(err.value) and "admin" not in str(err.value)
    assert "127.0.0.1" in str(err.value)


@pytest.mark.parametrize("token", ["two\nlines", "has space", "caf\u00e9", "tab\there"])
async def test_a_token_no_header_can_carry_is_refused_without_echoing_it(
    glance_server: GlanceServer, token: str
) -> None:
    img = str(uuid.uuid4())
    client = GlanceClient(glance_server.url, token=token, retry=FAST)
    try:
        with pytest.raises(InvalidInput, match="X-Auth-Token has characters") as err:
            await client.get_image(img)
    finally:
        await client.close()
    assert token not in str(err.value) and img in str(err.value)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVMCACHE_", "OS_"))}
    env = clean | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "pvmcache_async", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_the_cli_refuses_a_glance_url_with_a_password_and_never_prints_it(
    glance_server: GlanceServer, tmp_path: Path, debug: bool
) -> None:
    url = glance_server.url.replace("//", f"//admin:{PASSWORD}@")
    img = str(uuid.uuid4())
    args = ["--debug"] if debug else []
    out = _cli(*args, "--glance-url", url, "--vg", f"file:{tmp_path}", "prefetch", img)

    assert out.returncode == 1
    assert PASSWORD not in out.stdout + out.stderr
    assert "has a user name or password in it" in out.stderr
    if not debug:
        assert out.stderr.count("\n") == 1
    assert glance_server.file_requests(img) == 0


def test_debug_output_of_a_redirected_download_holds_neither_token(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    from ..faultproxy import ThreadedFaultProxy

    img = glance_server.create_image(disk_image(MiB, seed=73))
    with ThreadedFaultProxy(glance_server.url) as proxy:
        proxy.plan(img, redirect(f"/v2/images/{img}/file"))
        out = _cli(
            "--debug",
            "--token",
            TOKEN,
            "--glance-url",
            proxy.url,
            "--vg",
            f"file:{tmp_path}",
            "prefetch",
            img,
        )
        assert [s.headers.get("x-auth-token") for s in proxy.file_gets(img)] == [TOKEN] * 2
    assert out.returncode == 0, out.stderr
    assert "redirected within Glance" in out.stderr  # --debug did log the request path
    assert TOKEN not in out.stdout + out.stderr


SECRET = "qs-" + uuid.uuid4().hex  # what a query or fragment of a URL would carry
IN_URL = [f"/?token={SECRET}", f"/v2#{SECRET}", f"/?token={SECRET}#frag", f"?a=b#{SECRET}"]


@pytest.mark.parametrize("tail", IN_URL)
def test_redact_url_cuts_every_url_in_a_text_to_its_origin_and_path(tail: str) -> None:
    text = f"talking to http://admin:{PASSWORD}@127.0.0.1:9292{tail} failed; see //h{tail} too"
    redacted = redact_url(text)
    assert SECRET not in redacted and PASSWORD not in redacted
    path = tail.partition("?")[0].partition("#")[0]
    assert redacted == f"talking to http://127.0.0.1:9292{path} failed; see //h{path} too"


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("where", ["option", "env"])
@pytest.mark.parametrize("tail", IN_URL)
def test_the_cli_refuses_a_glance_url_with_a_query_or_fragment_and_never_prints_it(
    tmp_path: Path, debug: bool, where: str, tail: str
) -> None:
    url = f"http://127.0.0.1:1{tail}"
    img = str(uuid.uuid4())
    args = [*(["--debug"] if debug else []), *(["--glance-url", url] if where == "option" else [])]
    env = {"PVMCACHE_GLANCE_URL": url} if where == "env" else {}
    out = _cli(*args, "--vg", f"file:{tmp_path}", "prefetch", img, env=env)

    assert out.returncode == 1
    assert SECRET not in out.stdout + out.stderr
    assert (
        "Glance URL 'http://127.0.0.1:1" in out.stderr and "has a query or fragment" in out.stderr
    )
    if not debug:
        assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_keystone_auth_url_s_query_and_fragment_are_never_printed(
    tmp_path: Path, debug: bool
) -> None:
    clouds = tmp_path / "clouds.yaml"
    auth = {
        "auth_url": f"http://127.0.0.1:1/v3?token={SECRET}#{SECRET}",  # nothing listens
        "username": "operator",
        "password": PASSWORD,
        "project_name": "demo",
        "user_domain_name": "Default",
        "project_domain_name": "Default",
    }
    clouds.write_text(json.dumps({"clouds": {"devstack": {"auth": auth}}}))
    args = ["--debug"] if debug else []
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
    out = _cli(*args, "--os-cloud", "devstack", "--vg", f"file:{tmp_path / 'vg'}", "prefetch",
               str(uuid.uuid4()), env=env)  # fmt: skip

    assert out.returncode == 1
    assert SECRET not in out.stdout + out.stderr and PASSWORD not in out.stdout + out.stderr
    assert "cannot reach keystone at http://127.0.0.1:1/v3 (user 'operator')" in out.stderr
    if not debug:  # keystoneauth's own warning, cut as well, then the error
        assert out.stderr.splitlines()[-1].startswith("pvmcache-async: cannot reach keystone")


def test_a_catalog_s_glance_endpoint_with_a_query_is_refused_without_echoing_it(
    keystone: KeystoneServer, operator: Credentials, tmp_path: Path
) -> None:
    region = "RegionQuery"
    keystone._admin("POST", "/regions", {"region": {"id": region}})
    keystone.add_endpoint(
        "image", "glance-query", f"http://127.0.0.1:1/?token={SECRET}", region=region
    )
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(operator.clouds_yaml("devstack", region=region))
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds)}
    out = _cli("--debug", "--os-cloud", "devstack", "--vg", f"file:{tmp_path / 'vg'}",
               "prefetch", str(uuid.uuid4()), env=env)  # fmt: skip

    assert out.returncode == 1
    assert SECRET not in out.stdout + out.stderr
    assert "Glance URL 'http://127.0.0.1:1/' has a query or fragment" in out.stderr
