"""A real nova cloud on loopback (``pvmcache_dev.nova_cloud``) booting servers through the cache.

RabbitMQ, MariaDB, placement, nova-api, nova-conductor, nova-scheduler and three nova-compute
processes (``compute_driver = pvmcache_ext.fake.FakeImageCacheDriver``, a file VG each) run
as separate processes against the session's real Glance; the dev package installs (apt-get, as
root) and starts them, and stops all of it at the end. Run it alone with
``pytest -m nova_cloud`` (about two minutes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvmcache_async.names import instance_disk_name
from pvmcache_dev.glance import GlanceServer
from pvmcache_dev.nova_cloud import FLAVOR_DISK_GB, NovaCloud
from pvmcache_dev.storm.images import sha256_file, upload_images, zeros_from
from pvmcache_dev.storm.nova import boot_storm, leftovers

pytestmark = [
    pytest.mark.nova_cloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs and runs RabbitMQ/MariaDB as root"),
]
HOSTS = ["compute1", "compute2", "compute3"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def cloud(glance_server: GlanceServer) -> Iterator[NovaCloud]:
    # not pytest's tmp_path: rabbitmq and mysql run as their own users and must reach it
    top = Path(tempfile.mkdtemp(prefix="pvmcache-nova-test-"))
    top.chmod(0o755)
    nova = NovaCloud(top / "cloud")
    try:
        nova.up(hosts=HOSTS, glance_url=glance_server.url)
        yield nova
    finally:
        pids = [pid for _, pid, _ in nova.processes()] if nova.state else []
        ports = list(nova.state.ports.values()) if nova.state else []
        nova.down()
        shutil.rmtree(top, ignore_errors=True)
    # down leaves nothing running: no process it started, nothing on its ports (epmd's too)
    assert _still_running(set(pids)) == []
    assert [port for port in ports if _listening(port)] == []
    assert not (top / "cloud").exists()


def _still_running(groups: set[int]) -> list[int]:
    """Processes (zombies aside: they have exited) in the process groups the cloud started:
    each service's own, with its workers and children (gunicorn's, rabbitmq's beam)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            left.append(int(stat.parent.name))
    return left


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_again_leaves_the_running_cloud_alone(cloud: NovaCloud) -> None:
    assert cloud.state is not None
    running = dict(cloud.state.pids)

    cloud.up()

    assert cloud.state.pids == running
    assert all(alive for _, _, alive in cloud.processes())


def _upload(glance: GlanceServer, size: int, seed: int, count: int = 1) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return upload_images(glance, count, size, seed, Path(tmp), name="nova-cloud")


def _cache_disks(cloud: NovaCloud, host: str) -> list[str]:
    return sorted(p.name for p in cloud.vg_path(host).glob("i_*"))


def test_a_storm_through_nova_gets_each_image_once_per_host(
    cloud: NovaCloud, glance_server: GlanceServer
) -> None:
    images = _upload(glance_server, 8 * MiB, seed=101, count=2)

    got = boot_storm(cloud, glance_server, images, 12, mode="cache", label="ci")

    assert (got.active, got.errors) == (12, 0)
    assert got.hosts_x_images == len(HOSTS) * len(images)  # every host booted both images
    assert got.glance_requests == len(HOSTS) * len(images)
    assert got.glance_bytes == len(HOSTS) * len(images) * 8 * MiB
    assert (got.disks, got.verified_disks) == (12, 12)
    assert got.leftovers == []
    for host in HOSTS:
        assert len(_cache_disks(cloud, host)) == 2


def _wait_for(what: str, check: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_compute_stopped_during_its_download_boots_the_image_after_a_restart(
    cloud: NovaCloud, glance_server: GlanceServer, sig: signal.Signals
) -> None:
    host, others = HOSTS[0], HOSTS[1:]
    ((image, sha),) = _upload(glance_server, 192 * MiB, seed=200 + sig).items()
    other_pids = {h: cloud.compute_pid(h) for h in others}
    other_disks = {h: sorted(p.name for p in cloud.vg_path(h).iterdir()) for h in others}
    vg = cloud.vg_path(host)

    cloud.api.boot(f"cut-{sig.name}-", image, host=host)
    _wait_for("the download's partial disk", lambda: any(vg.glob("p_*")))
    cloud.stop_compute(host, sig)

    interrupted = cloud.api.server_ids(f"cut-{sig.name}-")
    assert cloud.api.server_ids(f"cut-{sig.name}-", "ACTIVE") == set()
    cloud.start_compute(host)
    _wait_for(
        "the interrupted build to be ERROR",
        lambda: cloud.api.server_ids(f"cut-{sig.name}-", "ERROR") == interrupted,
    )
    gets = glance_server.file_requests(image)  # the cut one is logged if gunicorn saw its end
    cloud.api.boot(f"after-{sig.name}-", image, host=host)
    _wait_for(
        "the next boot to be ACTIVE",
        lambda: len(cloud.api.server_ids(f"after-{sig.name}-", "ACTIVE")) == 1,
    )

    (server,) = cloud.api.server_ids(f"after-{sig.name}-")
    disk = vg / instance_disk_name(server)  # the flavor's root disk: the image, then zeros
    assert disk.stat().st_size == FLAVOR_DISK_GB << 30
    assert sha256_file(disk, 192 * MiB) == sha and zeros_from(disk, 192 * MiB)
    assert leftovers(cloud) == []
    assert glance_server.file_requests(image) == gets + 1
    for h in others:  # never touched: same process, same disks, nothing of this image
        assert cloud.compute_pid(h) == other_pids[h]
        assert sorted(p.name for p in cloud.vg_path(h).iterdir()) == other_disks[h]
    up = {s["host"] for s in cloud.api.compute_services() if s["state"] == "up"}
    assert up == set(HOSTS)


def test_a_mode_the_storm_through_nova_lacks_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pvmcache_async", "storm", "--through", "nova",
         "--modes", "cache,per-image-lock"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "per-image-lock" in proc.stderr
