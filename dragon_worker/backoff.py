"""Exponential backoff with full jitter for reconnecting to the server.

Full jitter (a uniform wait between 0 and the exponential bound) spreads the
reconnections of many workers after a server restart instead of having them all
return in the same second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Waits of ``uniform(0, min(cap, initial * 2**attempt))`` seconds."""

    initial_seconds: float = 1.0
    max_seconds: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def bound(self) -> float:
        """The largest wait the next call to :meth:`next_delay` may return."""
        # Cap the exponent too: 2.0**2000 overflows a float.
        return min(
            self.max_seconds, self.initial_seconds * 2.0 ** min(self.attempt, 60)
        )

    def next_delay(self) -> float:
        """The wait before the next try, in seconds; grows with each call."""
        # Never below a tenth of the first wait, so a failing server is not spun on.
        delay = max(self.initial_seconds / 10, self.rng.uniform(0.0, self.bound()))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
