"""Which cached images a prune removes: pure functions of the entries, the images in use,
the time and the budget; no VG, no Glance, no locks (``ImageCache.prune`` acts on them).

Two rules, applied in order: an image unused for ``min_age`` seconds goes (``expired``);
then, least recently used first, unused images go until the rest fits the budget
(``over_budget``; the budget ignores ``min_age``). An image in use is never chosen. A last use
ahead of the clock counts as a use now (the catalog reads it so; ``expired`` holds to it for
entries from elsewhere), so no date can make an image immune to a budget.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pvmcache_async.errors import InvalidInput
from pvmcache_async.models import CacheEntry


@dataclass(frozen=True, slots=True)
class Budget:
    """The most the cache may hold; None is no limit."""

    max_bytes: int | None = None
    max_count: int | None = None

    def __post_init__(self) -> None:
        if (self.max_bytes or 0) < 0 or (self.max_count or 0) < 0:
            raise InvalidInput("max_bytes and max_count must not be negative")

    def exceeded_by(self, entries: Collection[CacheEntry]) -> bool:
        return (self.max_bytes is not None and sum(e.size for e in entries) > self.max_bytes) or (
            self.max_count is not None and len(entries) > self.max_count
        )


def least_recently_used(entries: Collection[CacheEntry]) -> list[CacheEntry]:
    """The entries, least recently used first (ties keep their order)."""
    return sorted(entries, key=lambda e: e.last_used)


def expired(
    entries: Collection[CacheEntry], *, in_use: Collection[str], now: float, min_age: float
) -> list[CacheEntry]:
    """The entries not in use and unused for at least ``min_age`` seconds, least recently
    used first."""
    return [
        e
        for e in least_recently_used(entries)
        if e.image_id not in in_use and now - min(e.last_used, now) >= min_age
    ]


def over_budget(
    entries: Sequence[CacheEntry], *, in_use: Collection[str], budget: Budget
) -> CacheEntry | None:
    """The next entry to remove so that ``entries`` fit the budget: the least recently used
    one not in use; None when they fit (or only images in use are left to remove)."""
    if not budget.exceeded_by(entries):
        return None
    return next((e for e in least_recently_used(entries) if e.image_id not in in_use), None)
