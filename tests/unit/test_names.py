"""Ids are validated before they touch a name; disk names fit PowerVM and never collide."""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvmcache_async.errors import InvalidInput
from pvmcache_async.names import (
    MAX_DISK_NAME,
    cache_disk_names,
    instance_disk_name,
    is_cache_disk_name,
    is_cache_disk_name_of,
    is_temporary_name,
    partial_disk_name,
    temporary_disk_name,
    validate_image_id,
    validate_instance_uuid,
)


def test_cache_disk_name_is_nova_powervm_style_prefix() -> None:
    image = "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00"
    assert next(cache_disk_names(image)) == "i_3e865d14_8c1e"


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f0",  # one digit short
        "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f0/",
        "{3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00}",
        "3e865d148c1e4c6d9a1e7b1b3c2a9f0000000",
        "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9g00",
        "",
        None,
        42,
    ],
)
def test_non_uuid_image_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidInput, match="is not a uuid"):
        validate_image_id(bad)


def test_ids_are_canonicalised_to_lower_case() -> None:
    assert validate_instance_uuid("3E865D14-8C1E-4C6D-9A1E-7B1B3C2A9F00") == (
        "3e865d14-8c1e-4c6d-9a1e-7b1b3c2a9f00"
    )


@given(st.uuids())
def test_all_names_fit_powervm_and_are_plain(u: uuid.UUID) -> None:
    image = str(u)
    names = [*itertools.islice(cache_disk_names(image), 4), instance_disk_name(image)]
    names += [partial_disk_name(), temporary_disk_name()]
    for name in names:
        assert len(name) <= MAX_DISK_NAME
        assert name.replace("_", "").isalnum() and name.isascii()
    assert not partial_disk_name().startswith("i_")
    assert all(is_cache_disk_name_of(image, n) for n in names[:4])
    assert not is_cache_disk_name_of(image, names[4])  # the instance disk


def test_images_sharing_a_prefix_get_distinct_fallback_names() -> None:
    a = "3e865d14-8c1e-4c6d-9a1e-000000000001"
    b = "3e865d14-8c1e-4c6d-9a1e-000000000002"
    first_a, first_b = next(cache_disk_names(a)), next(cache_disk_names(b))
    assert first_a == first_b  # the short prefix collides ...
    assert list(itertools.islice(cache_disk_names(a), 1, 4)) != list(
        itertools.islice(cache_disk_names(b), 1, 4)
    )  # ... the fallbacks do not
    assert not is_cache_disk_name_of(b, next(itertools.islice(cache_disk_names(a), 1, 2)))


def test_every_writer_gets_a_partial_name_of_its_own() -> None:
    names = {partial_disk_name() for _ in range(1000)} | {
        temporary_disk_name() for _ in range(1000)
    }
    assert len(names) == 2000
    assert all(is_temporary_name(n) and not is_cache_disk_name(n) for n in names)
