"""How a Glance request retries transient failures: a bounded count in a row, with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pvmcache_async.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures are retried.

    ``retries`` is the number of failed attempts in a row after which a request gives up (the
    CLI's ``--retries``: at least 1, the first attempt; ``retries - 1`` of them are retries).
    An attempt that received data starts the count afresh, so a long download survives many
    separate drops. The wait after the n-th failure is drawn from [d/2, d] with
    d = ``backoff`` * 2**(n-1), capped at ``max_backoff`` (a server's ``Retry-After``
    lengthens it up to that cap).
    """

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0

    def __post_init__(self) -> None:
        if self.retries < 1 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise InvalidInput(
                "retries must be at least 1, backoff not negative, max_backoff not below backoff"
            )

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(failures - 1, 30))
        wait = random.uniform(ceiling / 2, ceiling)  # jitter: a storm's retries spread out
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait
