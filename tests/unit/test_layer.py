"""The unit layer stands alone: it imports no nova module."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import layer

UNIT = Path(__file__).parent


def test_the_unit_layer_imports_no_nova(request: pytest.FixtureRequest) -> None:
    if all(UNIT in item.path.parents for item in request.session.items):
        # a run of the unit layer alone: nothing in the process may have imported nova
        assert layer.nova_modules() == set()
    elif layer.preloaded:
        pytest.skip("another layer imported nova first; run pytest tests/unit to check")
    assert layer.imported == set(), f"the unit layer imported {sorted(layer.imported)}"
