"""The dev Glance is a real Glance: records, downloads, ranges, request counting."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from pvmcache_dev.glance import (
    ADMIN_HEADERS,
    MEMBER_HEADERS,
    DevGlanceError,
    GlanceServer,
    ensure_venv,
)

# Loopback only: never let an http_proxy setting reroute these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers or {})) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_image_roundtrip_range_and_counting(glance_server: GlanceServer) -> None:
    data = os.urandom(300 << 10)
    image_id = glance_server.create_image(data, name="roundtrip")
    record = glance_server.image(image_id)
    assert record["status"] == "active"
    assert record["size"] == len(data)
    assert record["os_hash_algo"] == "sha512"
    assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert record["checksum"] == hashlib.md5(data).hexdigest()
    assert glance_server.file_requests(image_id) == 0

    url = f"{glance_server.url}/v2/images/{image_id}/file"
    assert _get(url) == (200, data)
    # Right after the download: the count must already include it.
    assert glance_server.file_requests(image_id) == 1

    offset = 123_457
    status, tail = _get(url, {"Range": f"bytes={offset}-"})
    assert status == 206
    assert tail == data[offset:]
    assert glance_server.file_requests(image_id) == 2
    assert glance_server.bytes_served(image_id) == len(data) + len(data) - offset
    assert _get(url, {"Range": f"bytes={len(data)}-"})[0] == 416
    assert glance_server.file_requests(image_id) == 3


def test_queued_deleted_and_unknown(glance_server: GlanceServer) -> None:
    queued = glance_server.create_image(None)
    assert glance_server.image(queued)["status"] == "queued"
    assert _get(f"{glance_server.url}/v2/images/{queued}/file") == (204, b"")
    assert glance_server.file_requests(queued) == 1
    assert glance_server.bytes_served(queued) == 0

    glance_server.delete(queued)
    assert _get(f"{glance_server.url}/v2/images/{queued}")[0] == 404
    assert _get(f"{glance_server.url}/v2/images/{queued}/file")[0] == 404
    unknown = "00000000-0000-4000-8000-000000000000"
    assert _get(f"{glance_server.url}/v2/images/{unknown}/file")[0] == 404
    with pytest.raises(DevGlanceError, match="404"):
        glance_server.image(unknown)


def test_file_from_path_and_noauth_deactivated(glance_server: GlanceServer, tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    wanted = str(uuid.uuid4())
    image_id = glance_server.create_image(src, image_id=wanted)
    assert image_id == wanted
    assert glance_server.image(image_id)["size"] == len(data)
    glance_server.deactivate(image_id)
    assert glance_server.image(image_id)["status"] == "deactivated"
    # noauth makes every caller admin, and admins may still download a deactivated image.
    assert _get(f"{glance_server.url}/v2/images/{image_id}/file") == (200, data)


def test_trusted_headers_deactivated_is_forbidden_to_members(tmp_path: Path) -> None:
    ensure_venv()
    with GlanceServer.start(tmp_path / "glance", trusted_headers=True) as server:
        image_id = server.create_image(b"x" * 4096)
        url = f"{server.url}/v2/images/{image_id}/file"
        assert _get(url, MEMBER_HEADERS) == (200, b"x" * 4096)
        server.deactivate(image_id)
        assert _get(url, MEMBER_HEADERS)[0] == 403
        assert _get(url, ADMIN_HEADERS)[0] == 200
        assert _get(url)[0] == 401  # no identity at all
        assert server.file_requests(image_id) == 4
