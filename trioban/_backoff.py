"""Retry backoff: Oban's jittered exponential by default."""

from __future__ import annotations

import random

MIN_PAD = 15.0
MAX_POW = 30  # caps a single delay at about 34 years; keeps timestamps in range
JITTER = 0.1


def exponential(attempt: int, *, mult: float = 1.0, min_pad: float = MIN_PAD) -> float:
    """Seconds to wait after ``attempt``: ``min_pad + mult * 2**attempt``.

    >>> exponential(1), exponential(5)
    (17.0, 47.0)
    """
    return min_pad + mult * 2.0 ** min(max(attempt, 0), MAX_POW)


def jitter(seconds: float, *, ratio: float = JITTER, rng: random.Random | None = None) -> float:
    """Spread ``seconds`` by up to ``ratio`` either way so retries don't move in lockstep.

    >>> 90 <= jitter(100) <= 110
    True
    """
    spread = seconds * ratio
    return seconds + (rng or random).uniform(-spread, spread)


def default_backoff(attempt: int) -> float:
    """Oban's default: ``jitter(15 + 2**attempt)`` seconds; 20 attempts span about 3 weeks."""
    return jitter(exponential(attempt))
