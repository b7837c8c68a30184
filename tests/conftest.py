"""Shared fixtures: a real Glance API on loopback for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pvmcache_async.devglance import GlanceServer, ensure_venv


@pytest.fixture(scope="session")
def glance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    ensure_venv()
    server = GlanceServer.start(tmp_path_factory.mktemp("glance"))
    try:
        yield server
    finally:
        server.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nova_cloud: boots servers on a real nova cloud (tests/test_nova_cloud.py)"
    )
