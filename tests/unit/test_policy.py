"""The cache's decisions as plain functions: which images a prune removes, and how a call's
outcome is named. No Glance, no disks, no locks."""

from __future__ import annotations

import uuid

import pytest

from pvmcache_async import CacheEntry, EntryState, InvalidInput, Outcome
from pvmcache_async.core.eviction import Budget, expired, over_budget
from pvmcache_async.core.ingest import IngestResult, outcome_of

NOW = 1_000_000.0
MiB = 1 << 20


def entry(last_used: float, size: int = MiB) -> CacheEntry:
    image_id = str(uuid.uuid4())
    return CacheEntry(image_id, f"i_{image_id[:8]}", size, "sha512", "0" * 128, 0.0, last_used,
                      EntryState.READY)  # fmt: skip


def ids(entries: list[CacheEntry]) -> list[str]:
    return [e.image_id for e in entries]


# -- expired: unused for min_age ------------------------------------------------------


def test_expired_are_the_entries_unused_for_min_age_least_recently_used_first() -> None:
    newest, oldest, middle = entry(NOW - 10), entry(NOW - 300), entry(NOW - 200)
    chosen = expired([newest, oldest, middle], in_use=(), now=NOW, min_age=100)
    assert ids(chosen) == ids([oldest, middle])


def test_an_entry_exactly_min_age_old_has_expired() -> None:
    at_limit = entry(NOW - 100)
    assert expired([at_limit], in_use=(), now=NOW, min_age=100) == [at_limit]


def test_an_image_in_use_never_expires() -> None:
    old = entry(NOW - 10_000)
    assert expired([old], in_use={old.image_id}, now=NOW, min_age=0) == []


def test_min_age_zero_expires_every_unused_entry() -> None:
    entries = [entry(NOW), entry(NOW - 1)]
    assert len(expired(entries, in_use=(), now=NOW, min_age=0)) == 2


# -- over_budget: least recently used until the rest fits ------------------------------


def test_nothing_is_over_a_budget_the_entries_fit() -> None:
    entries = [entry(NOW - 1, 2 * MiB), entry(NOW - 2, 2 * MiB)]
    assert over_budget(entries, in_use=(), budget=Budget(max_bytes=4 * MiB, max_count=2)) is None
    assert over_budget(entries, in_use=(), budget=Budget()) is None


def test_over_a_byte_budget_the_least_recently_used_goes_first() -> None:
    recent, old = entry(NOW - 1, 2 * MiB), entry(NOW - 50, 2 * MiB)
    victim = over_budget([recent, old], in_use=(), budget=Budget(max_bytes=3 * MiB))
    assert victim == old


def test_over_a_count_budget_the_least_recently_used_goes_first() -> None:
    a, b, c = entry(NOW - 3), entry(NOW - 1), entry(NOW - 2)
    assert over_budget([a, b, c], in_use=(), budget=Budget(max_count=2)) == a


def test_the_budget_ignores_min_age_but_never_picks_an_image_in_use() -> None:
    in_use, next_lru = entry(NOW - 50), entry(NOW - 40)
    budget = Budget(max_count=1)
    assert over_budget([in_use, next_lru], in_use={in_use.image_id}, budget=budget) == next_lru


def test_over_budget_with_only_images_in_use_left_picks_none() -> None:
    a, b = entry(NOW - 2), entry(NOW - 1)
    budget = Budget(max_count=0)
    assert over_budget([a, b], in_use={a.image_id, b.image_id}, budget=budget) is None


def test_removing_what_over_budget_picks_reaches_the_budget() -> None:
    entries = [entry(NOW - i, MiB) for i in range(6)]
    budget = Budget(max_bytes=2 * MiB)
    while (victim := over_budget(entries, in_use=(), budget=budget)) is not None:
        entries.remove(victim)
    assert sorted(e.last_used for e in entries) == [NOW - 1, NOW]  # the two most recent


def test_a_last_use_ahead_of_the_clock_counts_as_a_use_now() -> None:
    ahead = entry(NOW + 10 * 365 * 86400)
    assert expired([ahead], in_use=(), now=NOW, min_age=0) == [ahead]
    assert expired([ahead], in_use=(), now=NOW, min_age=100) == []


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(InvalidInput, match="must not be negative"):
        Budget(max_bytes=-1)
    with pytest.raises(InvalidInput, match="must not be negative"):
        Budget(max_count=-1)


# -- outcomes ---------------------------------------------------------------------------


def ingested(*, downloaded: bool, waited: bool) -> IngestResult:
    return IngestResult(entry(NOW), downloaded=downloaded, waited=waited,
                        fetched=MiB if downloaded else 0)  # fmt: skip


def test_a_disk_ready_at_once_is_a_hit() -> None:
    assert outcome_of(None, leader=True) is Outcome.HIT


def test_the_leader_of_a_download_missed() -> None:
    assert outcome_of(ingested(downloaded=True, waited=False), leader=True) is Outcome.MISS
    assert outcome_of(ingested(downloaded=True, waited=True), leader=True) is Outcome.MISS


def test_a_caller_that_waited_on_this_process_download_joined_it() -> None:
    assert outcome_of(ingested(downloaded=True, waited=False), leader=False) is Outcome.JOINED


def test_a_leader_that_waited_on_another_process_download_joined_it() -> None:
    assert outcome_of(ingested(downloaded=False, waited=True), leader=True) is Outcome.JOINED


def test_a_leader_that_found_it_cached_under_a_free_lock_hit() -> None:
    assert outcome_of(ingested(downloaded=False, waited=False), leader=True) is Outcome.HIT
