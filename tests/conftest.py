"""Shared fixtures: a real Glance API on loopback for the whole session, and a real Keystone
with a Glance in its keystone flavor for the tests that authenticate.

Two hooks order the layers: nova's threading mode is set up before the first test module
outside ``tests/unit`` is imported (never for the unit layer alone), and the unit layer runs
first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pvmcache_dev.glance import GlanceServer, ensure_venv
from pvmcache_dev.keystone import Credentials, KeystoneServer, ensure_keystone_venv


@pytest.fixture(scope="session")
def glance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    ensure_venv()
    server = GlanceServer.start(tmp_path_factory.mktemp("glance"))
    try:
        yield server
    finally:
        server.stop()


# Tokens of seconds: a download held open longer outlives its token (not less: on a loaded
# machine a token may wait seconds between its issue and its check).
TOKEN_SECONDS = 8


@pytest.fixture(scope="session")
def keystone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeystoneServer]:
    """A real Keystone on loopback, started once: tokens expire after TOKEN_SECONDS."""
    ensure_keystone_venv()
    server = KeystoneServer.start(
        tmp_path_factory.mktemp("keystone"), token_expiration=TOKEN_SECONDS
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def keystone_glance(
    keystone: KeystoneServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlanceServer]:
    """Glance in its keystone flavor (keystonemiddleware checks every token), in the catalog."""
    ensure_venv()
    service_user = keystone.add_user("glance", "service", role="admin")
    server = GlanceServer.start(tmp_path_factory.mktemp("glance-keystone"), keystone=service_user)
    try:
        keystone.add_endpoint("image", "glance", server.url)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def operator(keystone: KeystoneServer) -> Credentials:
    """An operator's account: the member role on a project of its own."""
    return keystone.add_user("operator", "demo")


_UNIT = Path(__file__).parent / "unit"


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Before a test module outside tests/unit is imported: nova in native threading mode
    (see tests/__init__.py)."""
    if isinstance(collector, pytest.Module) and _UNIT not in collector.path.parents:
        import nova.tests.functional  # noqa: F401


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The unit layer runs first, so a broken core fails in seconds, before a server starts.
    (``testpaths = ["tests/unit", "tests"]`` would not do it: pytest merges overlapping paths
    and collects them in the order of the file system.)"""
    items.sort(key=lambda item: _UNIT not in item.path.parents)  # stable: else as collected


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nova_cloud: boots servers on a real nova cloud (tests/test_nova_cloud.py)"
    )
