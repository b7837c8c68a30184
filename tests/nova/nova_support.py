"""The real nova for tests: its config, a real (sqlite) database, real Instance objects.

``nova_db`` migrates nova's main database into a temp file once per session, so that
``_list_running_instances`` reads block device mappings from nova's database through nova's
own code, and instances are created and listed as the compute manager lists them.

A pytest plugin (``pytest_plugins``) without asserts: PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nova.conf
import pytest
from nova import context as nova_context
from nova import objects
from nova.compute import vm_states
from nova.db import migration

from pvmcache_async.driver_hook import DriverHook
from pvmcache_async.nova import conf as pvm_conf
from pvmcache_dev.glance import GlanceServer

CONF = nova.conf.CONF
PROJECT, USER = "pvmcache-project", "pvmcache-user"


@pytest.fixture(scope="session")
def _nova_db_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nova")


def _db_overrides(db: Path) -> list[tuple[str, object, str | None]]:
    return [
        ("connection", f"sqlite:///{db / 'nova.sqlite'}", "database"),
        ("instances_path", str(db / "instances"), None),
    ]


@pytest.fixture(scope="session")
def nova_db(_nova_db_path: Path) -> Iterator[Any]:
    """An admin RequestContext on a migrated nova database (one per session).

    CONF is used unparsed, with its defaults: nova's functional tests (test_nova_*.py), in
    the same session, parse it themselves and reset it, overrides included, after each test;
    so ``nova_conf`` sets this database again for each test that uses it.
    """
    objects.register_all()
    pvm_conf.register_opts(CONF)
    for name, value, group in _db_overrides(_nova_db_path):
        CONF.set_override(name, value, group)
    migration.db_sync()  # nova's engine is bound to this database from here on
    yield nova_context.RequestContext(USER, PROJECT, is_admin=True, auth_token="nova-token")
    for name, _, group in _db_overrides(_nova_db_path):
        CONF.clear_override(name, group)


@pytest.fixture
def nova_conf(
    tmp_path: Path, glance_server: GlanceServer, nova_db: Any, _nova_db_path: Path
) -> Iterator[Path]:
    """nova's CONF for one test: a file VG under tmp_path, Glance from nova's [glance]."""
    pvm_conf.register_opts(CONF)
    vg = tmp_path / "vg"
    overrides = [
        *_db_overrides(_nova_db_path),
        ("volume_group", f"file:{vg}", pvm_conf.GROUP),
        ("api_servers", [glance_server.url], "glance"),
    ]
    for name, value, group in overrides:
        CONF.set_override(name, value, group)
    yield vg
    CONF.clear_override("remove_unused_base_images", "image_cache")
    CONF.clear_override("remove_unused_original_minimum_age_seconds", "image_cache")
    for name in ("enabled", "disk_driver", "volume_group", "max_bytes", "max_count"):
        CONF.clear_override(name, pvm_conf.GROUP)
    CONF.clear_override("api_servers", "glance")


@pytest.fixture
def hook(nova_conf: Path) -> Iterator[DriverHook]:
    h = DriverHook(CONF)
    yield h
    h.close()


def make_instance(ctx: Any, image_id: str, **fields: Any) -> Any:
    """A real nova Instance of this host, saved in nova's database."""
    values: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "image_ref": image_id,
        "host": CONF.host,
        "vm_state": vm_states.ACTIVE,
        "task_state": None,
        "project_id": PROJECT,
        "user_id": USER,
    }
    inst = objects.Instance(context=ctx, **{**values, **fields})
    inst.create()
    return inst


def host_instances(ctx: Any) -> Any:
    """The instances nova's periodic task hands to manage_image_cache (soft-deleted ones too)."""
    filters = {"deleted": False, "soft_deleted": True, "host": [CONF.host]}
    return objects.InstanceList.get_by_filters(ctx, filters, expected_attrs=[])


def destroy_all(ctx: Any) -> None:
    for inst in host_instances(ctx):
        inst.destroy()


def age(vg: Path, image_id: str, seconds: float) -> None:
    """Make the image's last use ``seconds`` earlier, in the cache's real index."""
    with sqlite3.connect(vg / ".pvmcache" / "index.sqlite") as db:
        db.execute(
            "UPDATE images SET last_used = last_used - ? WHERE image_id = ?", (seconds, image_id)
        )
    db.close()
