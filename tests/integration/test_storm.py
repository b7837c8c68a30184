"""The storm command end to end on tiny images: every mode, every field, sane values."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pvmcache_dev.storm.modes import MODES, NOVA_MODES
from pvmcache_dev.storm.report import TARGET_STORM_DEPLOYS, format_report
from pvmcache_dev.storm.run import StormReport

MiB = 1 << 20
IMAGES, SIZE, DEPLOYS = 2, 2 * MiB, 8
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _storm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvmcache_async", "storm", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("storm")
    plot = out / "storm.png"
    args = ["--images", str(IMAGES), "--image-size", "2MiB", "--deploys", str(DEPLOYS)]
    args += ["--speed", "--workdir", str(out), "--json"]
    if HAVE_MATPLOTLIB:
        args += ["--plot", str(plot)]
    proc = _storm(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


def test_every_mode_reports_every_field(storm: tuple[dict[str, Any], Path]) -> None:
    report, _ = storm
    modes = {m["mode"]: m for m in report["modes"]}
    assert set(modes) == {"cache", "no-cache", "per-image-lock"}
    for m in modes.values():
        assert m["deploys"] == DEPLOYS
        assert m["images"] == IMAGES
        assert m["unique_image_bytes"] == IMAGES * SIZE
        assert m["verified_disks"] == DEPLOYS
        assert 0 < m["p50"] <= m["p95"] <= m["p99"] <= m["makespan"]
        assert 0 < m["rss_at_start_mib"] <= m["peak_rss_mib"]  # two readings of its own child
        assert m["cpu_seconds"] > 0
        assert sum(m["outcomes"].values()) == DEPLOYS
        assert len(m["timeline"]["disks"]) == DEPLOYS
        assert sum(m["timeline"]["bytes"]) == m["glance_bytes"]


def test_cache_mode_downloads_each_image_once(storm: tuple[dict[str, Any], Path]) -> None:
    cache = next(m for m in storm[0]["modes"] if m["mode"] == "cache")
    assert cache["glance_requests"] == IMAGES
    assert cache["glance_bytes"] == IMAGES * SIZE
    assert cache["dedup"] == 1.0
    assert cache["outcomes"]["miss"] == IMAGES


def test_no_cache_mode_downloads_once_per_deploy(storm: tuple[dict[str, Any], Path]) -> None:
    no_cache = next(m for m in storm[0]["modes"] if m["mode"] == "no-cache")
    assert no_cache["glance_requests"] == DEPLOYS
    assert no_cache["glance_bytes"] == DEPLOYS * SIZE
    assert no_cache["dedup"] == DEPLOYS / IMAGES


def test_per_image_lock_mode_downloads_each_image_once(
    storm: tuple[dict[str, Any], Path],
) -> None:
    locked = next(m for m in storm[0]["modes"] if m["mode"] == "per-image-lock")
    assert locked["glance_requests"] == IMAGES
    assert locked["outcomes"] == {"miss": IMAGES, "joined": 0, "hit": DEPLOYS - IMAGES}


def test_references_single_deploys_and_ratios_are_reported(
    storm: tuple[dict[str, Any], Path],
) -> None:
    report, _ = storm
    refs = {r["name"]: r for r in report["references"]}
    assert set(refs) == {"fetch", "fetch_write_verify", "copy", "copy_sync"}
    assert all(r["seconds"] > 0 and r["bytes"] == SIZE for r in refs.values())
    single = report["single"]
    for key in ("cache_cold_seconds", "cache_ensure_seconds", "cache_warm_seconds"):
        assert single[key] > 0
    assert {s["choice"] for s in report["speed"]} >= {
        "dense ingest (zeros written)",
        "first deploy cloned after the download (no tee)",
    }
    assert report["ratios"]["cache_dedup"] == 1.0
    assert all(v is not None and v > 0 for v in report["ratios"].values())


def test_the_text_report_judges_the_storm_targets_only_at_their_size(
    storm: tuple[dict[str, Any], Path],
) -> None:
    report = StormReport.from_json(storm[0])
    small = format_report(report)
    assert "cache_dedup" in small and "(>= 1.0: met)" in small
    assert small.count(f"deploys; not judged at {DEPLOYS})") == 2
    report.plan = replace(report.plan, deploys=TARGET_STORM_DEPLOYS)
    report.ratios["makespan_per_image_lock_over_cache"] = 0.5
    full = format_report(report)
    assert "not judged" not in full
    line = next(x for x in full.splitlines() if "makespan_per_image_lock_over_cache" in x)
    assert line.split()[1:] == ["0.500", "(>=", "1.0:", "NOT", "met)"]


def test_the_work_directory_is_left_clean(storm: tuple[dict[str, Any], Path]) -> None:
    assert list(storm[1].iterdir()) == ([storm[1] / "storm.png"] if HAVE_MATPLOTLIB else [])


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="the bench extra (matplotlib) is not installed")
def test_plot_is_written(storm: tuple[dict[str, Any], Path]) -> None:
    assert (storm[1] / "storm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_mode_is_a_one_line_error() -> None:
    proc = _storm("--modes", "cache,fastest", "--json")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "fastest" in proc.stderr


def test_the_command_line_knows_the_storm_modes_without_loading_the_storm() -> None:
    probe = (
        "import sys, pvmcache_async.cli.main as cli\n"
        "cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.startswith('pvmcache_dev.storm.')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.split() == ["['pvmcache_dev.storm.modes']"]
    shown = "".join(_storm("--help").stdout.split())  # argparse wraps lines at hyphens
    assert f"default{','.join(MODES)};throughnova:{','.join(NOVA_MODES)})" in shown


# The product without the dev package, as a wheel installs it: pvmcache_dev cannot be imported.
_WITHOUT_DEV = (
    "import sys\n"
    "sys.modules['pvmcache_dev'] = None\n"
    "from pvmcache_async.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _without_dev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_DEV, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_the_dev_package_the_storm_says_what_to_install_in_one_line(
    tmp_path: Path,
) -> None:
    proc = _without_dev("storm", "--images", "1", "--deploys", "1", "--workdir", str(tmp_path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "pvmcache-async: storm is a dev tool: install it with `pip install -e ./dev` from a "
        "checkout (scripts/bootstrap does)\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_without_the_dev_package_the_help_still_shows_and_names_the_install() -> None:
    storm_help = _without_dev("storm", "--help")
    assert storm_help.returncode == 0, storm_help.stderr
    assert "pip install -e ./dev" in storm_help.stdout and "--image-size" in storm_help.stdout
    main_help = _without_dev("--help")
    assert main_help.returncode == 0, main_help.stderr
    assert "storm" in main_help.stdout and "prefetch" in main_help.stdout
