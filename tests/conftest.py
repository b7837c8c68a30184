"""Shared fixtures: a real Glance API on loopback for the whole session, and a real Keystone
with a Glance in its keystone flavor for the tests that authenticate (integration, nova and
cloud layers; the unit layer uses none of them)."""

from __future__ import annotations

from collections.abc import Iterator

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nova_cloud: boots servers on a real nova cloud (tests/cloud/test_nova_cloud.py)"
    )
