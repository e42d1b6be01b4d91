"""Retry delays shared by bgq's tasks."""

from __future__ import annotations

import random

from bgq import defaults


def backoff(
    retries: int, cap: float = defaults.RETRY_BACKOFF_MAX, base: float = defaults.RETRY_BACKOFF_BASE
) -> float:
    """Seconds before retry number `retries` + 1: exponential, capped, with full jitter."""
    ceiling = min(cap, base * 2**retries)
    return random.uniform(0, ceiling)
