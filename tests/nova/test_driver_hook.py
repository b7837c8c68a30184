"""The driver facade as nova-compute calls it: synchronous, from many native threads at once."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from keystoneauth1 import loading as ks_loading
from nova import objects, service_auth

from pvmcache_async.driver_hook import DriverHook, build_errors
from pvmcache_async.errors import CacheError, DiskExists, DiskTooSmall, GlanceError, InvalidInput
from pvmcache_async.models import DeployResult
from pvmcache_dev.glance import GlanceServer

from ..faultproxy import FaultProxy, ThreadedFaultProxy, stall
from ..support import disk_image, holds, vg_files
from .nova_support import CONF, make_instance

pytest_plugins = ["tests.nova.nova_support"]
MiB = 1 << 20


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pvmcache-loop"]


def test_cache_image_returns_true_when_it_fetched_then_false(
    hook: DriverHook, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=100))
    assert hook.capabilities == {"has_imagecache": True}
    assert hook.cache_image(nova_db, img) is True
    assert hook.cache_image(nova_db, img) is False
    assert glance_server.file_requests(img) == 1
    assert vg_files(nova_conf) == ["i_" + img[:13].replace("-", "_")]


def test_the_facade_from_many_threads_at_once_downloads_each_image_once(
    hook: DriverHook, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    data = [disk_image(2 * MiB, seed=110 + i) for i in range(3)]
    imgs = [glance_server.create_image(blob) for blob in data]
    calls = [(i, n) for i in range(3) for n in range(12)]  # per image: 4 pre-caches, 8 deploys
    start = threading.Barrier(len(calls))
    instances = {c: make_instance(nova_db, imgs[c[0]]) for c in calls}

    def call(c: tuple[int, int]) -> Any:
        i, n = c
        start.wait()  # every thread calls at the same moment
        if n < 4:
            return hook.cache_image(nova_db, imgs[i])
        meta = objects.ImageMeta.from_dict({"id": imgs[i], "disk_format": "raw"})
        return hook.create_disk_from_image(nova_db, instances[c], meta)

    with ThreadPoolExecutor(len(calls)) as pool:
        results = dict(zip(calls, pool.map(call, calls), strict=True))

    for i, img in enumerate(imgs):
        assert glance_server.file_requests(img) == 1
        fetched = [results[(i, n)] for n in range(4)]
        deploys = [results[(i, n)] for n in range(4, 12)]
        # True only for the call that itself downloaded (it may have been a deploy)
        assert fetched.count(True) + [d.outcome for d in deploys].count("miss") == 1
        for d in deploys:
            assert (nova_conf / d.disk).read_bytes() == data[i]
    assert len(_loop_threads()) == 1  # one loop serves every thread


def test_an_instance_disk_is_its_flavor_s_root_disk_or_the_image_s_size_for_root_gb_0(
    hook: DriverHook, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    data = disk_image(MiB, seed=105)
    img = glance_server.create_image(data)
    meta = objects.ImageMeta.from_dict({"id": img, "disk_format": "raw"})
    sizes = {1: 1 << 30, 0: len(data)}  # root_gb 0: nova's "the image's size"
    for root_gb, size in sizes.items():
        flavor = objects.Flavor(flavorid=str(root_gb), name=f"d{root_gb}", root_gb=root_gb)
        inst = make_instance(nova_db, img, flavor=flavor)
        deployed = hook.create_disk_from_image(nova_db, inst, meta)
        assert deployed is not None and holds(nova_conf / deployed.disk, data, size)
    assert (nova_conf / deployed.cache_disk).stat().st_size == len(data)


def test_a_disk_too_small_for_its_image_is_nova_s_own_flavor_disk_error() -> None:
    from nova import exception as nova_exception

    too_small = DiskTooSmall("too small", image_id=None, disk_size=1 << 30, image_size=3 << 30)
    expected = pytest.raises(nova_exception.FlavorDiskSmallerThanImage)
    with expected as err, build_errors({"id": str(uuid.uuid4())}):
        raise too_small
    # nova's compute manager aborts the build on FlavorDiskTooSmall, as libvirt's check does
    assert isinstance(err.value, nova_exception.FlavorDiskTooSmall)
    assert f"{1 << 30} bytes, image is {3 << 30} bytes" in str(err.value)


@pytest.mark.parametrize(
    "setting, value", [("enabled", False), ("disk_driver", "ssp")], ids=["off", "ssp"]
)
def test_an_inactive_cache_reports_no_imagecache_and_does_nothing(
    nova_conf: Path, nova_db: Any, glance_server: GlanceServer, setting: str, value: object
) -> None:
    CONF.set_override(setting, value, "pvmcache")
    hook = DriverHook(CONF)
    try:
        assert hook.capabilities == {"has_imagecache": False}
        img = glance_server.create_image(disk_image(MiB, seed=120))
        inst = make_instance(nova_db, img)
        meta = objects.ImageMeta.from_dict({"id": img, "disk_format": "raw"})
        hook.manage_image_cache(nova_db, [inst])
        assert hook.create_disk_from_image(nova_db, inst, meta) is None
        with pytest.raises(NotImplementedError):  # nova reports the image 'unsupported'
            hook.cache_image(nova_db, img)
        assert glance_server.file_requests(img) == 0
        assert not nova_conf.exists()  # the VG was never even opened
        assert "pvmcache-loop" not in {t.name for t in threading.enumerate()}  # none started
    finally:
        hook.close()


def test_close_stops_the_loop_thread_and_the_cache_outlives_it(
    hook: DriverHook, nova_db: Any, glance_server: GlanceServer
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=130))
    assert hook.cache_image(nova_db, img) is True
    assert len(_loop_threads()) == 1
    hook.close()
    assert _loop_threads() == []
    assert hook.cache_image(nova_db, img) is False  # started again lazily; the index persists
    hook.close()
    assert _loop_threads() == []


Tokens = list[tuple[str | None, str | None]]  # (X-Auth-Token, X-Service-Token) per request


class _TokenRecorder(BaseHTTPRequestHandler):
    """A loopback proxy in front of the real Glance that records the tokens of each request."""

    upstream: ClassVar[str] = ""
    tokens: ClassVar[Tokens] = []

    def do_GET(self) -> None:
        self.tokens.append((self.headers.get("X-Auth-Token"), self.headers.get("X-Service-Token")))
        host, port = self.upstream.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", self.path)
        resp = conn.getresponse()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("connection", "transfer-encoding"):
                self.send_header(name, value)
        self.end_headers()
        while chunk := resp.read(1 << 20):
            self.wfile.write(chunk)
        conn.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recording_proxy(glance_server: GlanceServer) -> Iterator[tuple[str, Tokens]]:
    tokens: Tokens = []
    handler = type("Recorder", (_TokenRecorder,), {"upstream": glance_server.url, "tokens": tokens})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tokens
    server.shutdown()
    server.server_close()


def test_glance_is_called_with_the_request_contexts_token(
    nova_conf: Path,
    nova_db: Any,
    glance_server: GlanceServer,
    recording_proxy: tuple[str, Tokens],
) -> None:
    tokens = _cache_one_through(recording_proxy, nova_db, glance_server, seed=140)
    assert tokens == [(nova_db.auth_token, None)] * 2  # the image record, then its data


def _cache_one_through(
    proxy: tuple[str, Tokens], ctx: Any, glance_server: GlanceServer, seed: int
) -> Tokens:
    """``cache_image`` of a new image with Glance behind the recording proxy (nova's own
    ``[glance] api_servers``); the tokens of the requests Glance got."""
    url, tokens = proxy
    CONF.set_override("api_servers", [url], "glance")
    hook = DriverHook(CONF)
    try:
        img = glance_server.create_image(disk_image(MiB, seed=seed))
        assert hook.cache_image(ctx, img) is True
    finally:
        hook.close()
    return tokens


@pytest.fixture
def service_user() -> Iterator[None]:
    """nova's [service_user] sending a service token: keystoneauth's admin_token plugin, so
    the token needs no keystone (the plugin's options are registered as nova loads it)."""
    opts = ks_loading.get_auth_plugin_conf_options("admin_token")
    CONF.register_opts(opts, group="service_user")
    settings = {
        "send_service_user_token": True,
        "auth_type": "admin_token",
        "endpoint": "http://127.0.0.1:1/identity",
        "token": "service-secret",
    }
    for name, value in settings.items():
        CONF.set_override(name, value, "service_user")
    service_auth.reset_globals()
    yield
    for name in settings:
        CONF.clear_override(name, "service_user")
    service_auth.reset_globals()
    # keystoneauth registers the plugins' options as it loads them; nova's own tests (in this
    # session too) parse CONF, and the password plugin's auth_url would then be required
    for plugin in ("admin_token", "password"):
        CONF.unregister_opts(ks_loading.get_auth_plugin_conf_options(plugin), group="service_user")


def test_glance_gets_nova_s_service_token_beside_the_request_s(
    nova_conf: Path,
    nova_db: Any,
    glance_server: GlanceServer,
    recording_proxy: tuple[str, Tokens],
    service_user: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = _cache_one_through(recording_proxy, nova_db, glance_server, seed=141)
    assert tokens == [(nova_db.auth_token, "service-secret")] * 2
    assert "service-secret" not in caplog.text and nova_db.auth_token not in caplog.text


def test_a_service_token_that_cannot_be_had_costs_only_the_service_token(
    nova_conf: Path,
    nova_db: Any,
    glance_server: GlanceServer,
    recording_proxy: tuple[str, Tokens],
    service_user: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a password plugin needs keystone, and nothing listens there
    CONF.register_opts(ks_loading.get_auth_plugin_conf_options("password"), group="service_user")
    password = {"auth_url": "http://127.0.0.1:1/v3", "username": "nova", "password": "pw-secret"}
    for name, value in {"auth_type": "password", **password}.items():
        CONF.set_override(name, value, "service_user")
    try:
        tokens = _cache_one_through(recording_proxy, nova_db, glance_server, seed=142)
    finally:
        for name in password:
            CONF.clear_override(name, "service_user")
    assert tokens == [(nova_db.auth_token, None)] * 2
    assert "no service token for Glance" in caplog.text and "pw-secret" not in caplog.text


def test_eventlet_mode_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    script = f"""
import eventlet
eventlet.monkey_patch()
import nova.conf
from nova import context
from pvmcache_async.driver_hook import DriverHook
from pvmcache_async.errors import CacheError
CONF = nova.conf.CONF
CONF([], project="nova", default_config_files=[])
hook = DriverHook(CONF)
CONF.set_override("volume_group", "file:{tmp_path / "vg"}", "pvmcache")
try:
    hook.cache_image(context.get_admin_context(), "{uuid.uuid4()}")
except CacheError as exc:
    print(exc)
"""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "concurrency_backend = threading" in out.stdout
    assert "eventlet" in out.stdout
    assert vg_files(tmp_path) == []


def test_no_glance_endpoint_is_one_clear_line(nova_conf: Path, nova_db: Any) -> None:
    CONF.clear_override("api_servers", "glance")  # and the context has no service catalog
    hook = DriverHook(CONF)
    try:
        with pytest.raises(GlanceError, match="no Glance endpoint") as info:
            hook.cache_image(nova_db, str(uuid.uuid4()))
        assert "\n" not in str(info.value)
    finally:
        hook.close()


def test_a_bad_image_id_is_one_clear_line_and_touches_nothing(
    hook: DriverHook, nova_db: Any, nova_conf: Path
) -> None:
    with pytest.raises(InvalidInput, match="not a uuid") as info:
        hook.cache_image(nova_db, "../../etc/passwd")
    assert "\n" not in str(info.value)
    assert vg_files(nova_conf) == []


def test_a_cached_image_deploys_even_when_the_glance_endpoint_cannot_be_found(
    hook: DriverHook, nova_db: Any, glance_server: GlanceServer, nova_conf: Path
) -> None:
    img = glance_server.create_image(disk_image(MiB, seed=130))
    assert hook.cache_image(nova_db, img) is True
    hook.close()
    CONF.clear_override("api_servers", "glance")  # a restarted compute, keystone unreachable
    restarted = DriverHook(CONF)
    try:
        meta = objects.ImageMeta.from_dict({"id": img, "disk_format": "raw"})
        deployed = restarted.create_disk_from_image(nova_db, make_instance(nova_db, img), meta)
        assert deployed is not None and deployed.outcome == "hit"
        with pytest.raises(GlanceError, match="no Glance endpoint"):  # a miss still says why
            restarted.cache_image(nova_db, str(uuid.uuid4()))
    finally:
        restarted.close()
    assert glance_server.file_requests(img) == 1


@pytest.fixture
def stalling_glance(
    glance_server: GlanceServer, nova_conf: Path
) -> Iterator[tuple[FaultProxy, ThreadedFaultProxy]]:
    """nova's [glance] api_servers pointing at a fault proxy in front of the real Glance (its
    own thread): a planned stall holds a download until ``release_stalls``."""
    threaded = ThreadedFaultProxy(glance_server.url)
    with threaded as proxy:
        CONF.set_override("api_servers", [proxy.url], "glance")
        yield proxy, threaded


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """``call()`` in a native thread, as nova calls the hook; its result or error lands in
    the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # what nova's thread would get, kept
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@contextlib.contextmanager
def _said(words: str, event: threading.Event) -> Iterator[None]:
    """``event`` is set once the hook logs a line holding ``words`` (at info)."""
    hook_log = logging.getLogger("pvmcache_async.driver_hook")
    handler = _Said(words, event)
    level = hook_log.level
    hook_log.addHandler(handler)
    hook_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        hook_log.removeHandler(handler)
        hook_log.setLevel(level)


class _Said(logging.Handler):
    """Sets ``event`` once a log record holding ``words`` is emitted."""

    def __init__(self, words: str, event: threading.Event) -> None:
        super().__init__()
        self.words, self.event = words, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.event.set()


def test_a_delete_racing_a_create_of_the_instance_waits_for_it_and_removes_its_disk(
    hook: DriverHook,
    nova_db: Any,
    glance_server: GlanceServer,
    nova_conf: Path,
    stalling_glance: tuple[FaultProxy, ThreadedFaultProxy],
) -> None:
    proxy, threaded = stalling_glance
    img = glance_server.create_image(disk_image(MiB, seed=150))
    inst = make_instance(nova_db, img)
    meta = objects.ImageMeta.from_dict({"id": img, "disk_format": "raw"})
    proxy.plan(img, stall(after=MiB // 2))  # the create is held before its disk exists
    create, created = _in_thread(lambda: hook.create_disk_from_image(nova_db, inst, meta))
    proxy.stalled.wait()
    # the delete either waits for the create (it says so) or has already returned: either
    # way, only then is the create let go, so the test decides, not the scheduler
    settled = threading.Event()
    with _said(f"instance {inst.uuid}: delete_instance_disk waits", settled):
        delete, deleted = _in_thread(lambda: (hook.delete_instance_disk(inst), settled.set())[0])
        settled.wait()
        threaded.release_stalls()
        create.join()
        delete.join()
    assert deleted == [None]
    assert isinstance(created[0], DeployResult), created
    assert vg_files(nova_conf) == ["i_" + img[:13].replace("-", "_")]  # the cache disk only


def test_closing_the_hook_mid_download_gives_nova_s_threads_an_error_they_catch(
    hook: DriverHook,
    nova_db: Any,
    glance_server: GlanceServer,
    nova_conf: Path,
    stalling_glance: tuple[FaultProxy, ThreadedFaultProxy],
) -> None:
    proxy, _ = stalling_glance
    data = disk_image(MiB, seed=151)
    img = glance_server.create_image(data)
    inst = make_instance(nova_db, img)
    meta = objects.ImageMeta.from_dict({"id": img, "disk_format": "raw"})
    proxy.plan(img, stall(after=MiB // 2))
    create, created = _in_thread(lambda: hook.create_disk_from_image(nova_db, inst, meta))
    proxy.stalled.wait()
    queued = threading.Event()  # a delete of the instance waits behind the create
    with _said(f"instance {inst.uuid}: delete_instance_disk waits", queued):
        delete, deleted = _in_thread(lambda: hook.delete_instance_disk(inst))
        queued.wait()
    hook.close()  # nova-compute stopping (cleanup_host) while the download is under way
    create.join()
    delete.join()

    for [error], image_id in ((created, img), (deleted, None)):
        assert isinstance(error, Exception), repr(error)  # nova's ``except Exception`` takes it
        assert isinstance(error, CacheError) and not isinstance(error, asyncio.CancelledError)
        assert error.image_id == image_id
        assert error.message == "the image cache was closed before this call ended"
    assert vg_files(nova_conf) == []  # no partial, no instance disk
    assert _loop_threads() == []
    # nothing of the instance stays locked: it is deployed and deleted again at once
    deployed = hook.create_disk_from_image(nova_db, inst, meta)
    assert deployed is not None and (nova_conf / deployed.disk).read_bytes() == data
    hook.delete_instance_disk(inst)
    assert vg_files(nova_conf) == ["i_" + img[:13].replace("-", "_")]


def test_two_instances_whose_disks_share_a_name_the_second_fails_at_once_naming_both(
    hook: DriverHook,
    nova_db: Any,
    glance_server: GlanceServer,
    nova_conf: Path,
    stalling_glance: tuple[FaultProxy, ThreadedFaultProxy],
) -> None:
    proxy, threaded = stalling_glance
    data = disk_image(MiB, seed=152)
    img = glance_server.create_image(data)
    first = make_instance(nova_db, img)
    second = make_instance(nova_db, img, uuid=first.uuid[:14] + str(uuid.uuid4())[14:])
    meta = objects.ImageMeta.from_dict({"id": img, "disk_format": "raw"})
    proxy.plan(img, stall(after=MiB // 2))
    create, created = _in_thread(lambda: hook.create_disk_from_image(nova_db, first, meta))
    try:
        proxy.stalled.wait()
        with pytest.raises(DiskExists) as err:  # passed on by the mixin: nova may reschedule
            hook.create_disk_from_image(nova_db, second, meta)
    finally:
        threaded.release_stalls()
        create.join()
    disk = "b_" + first.uuid[:13].replace("-", "_")
    assert str(err.value) == (
        f"image {img}: instances {first.uuid} and {second.uuid} would both get disk {disk}"
    )
    assert len(proxy.file_gets(img)) == 1
    assert isinstance(created[0], DeployResult) and created[0].disk == disk
    assert (nova_conf / disk).read_bytes() == data
