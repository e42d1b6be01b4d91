"""Which models the live workers serve, as a producer sees them: a job for a model that no live
worker serves is refused at once (`ModelNotServed`) instead of waiting in a queue for nobody.

"Served" is trusted for a short while (SERVED_MEMO seconds: one read of the workers' entries a
second, not one per job); "not served" never is: a refusal always comes from a fresh read, so a
worker that has just started is not refused for. The memo errs the other way only: for up to
SERVED_MEMO seconds after the last worker of a model went away, its jobs are still queued, as
they would have been a moment earlier (`bgq status` flags jobs waiting for a model nobody
serves).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from bgq import defaults
from bgq.errors import ModelNotServed


class ServedModels:
    """The models live workers serve (model -> pool processes), read through `read`."""

    def __init__(
        self,
        read: Callable[[], Mapping[str, int]],
        memo: float = defaults.SERVED_MEMO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`memo`: seconds a "served" answer is trusted (math.inf: checked once, as ingest
        does); `clock` is the monotonic clock the memo ages by."""
        self._read = read
        self._memo = memo
        self._clock = clock
        self._lock = threading.Lock()
        self._served: Mapping[str, int] = {}
        self._read_at = -float("inf")

    def require(self, model: str) -> None:
        """Return if some live worker serves `model`, else raise ModelNotServed (read fresh)."""
        with self._lock:
            if model in self._served and self._clock() - self._read_at < self._memo:
                return
        served = self.current()
        if model not in served:
            raise ModelNotServed(model, served)

    def current(self) -> Mapping[str, int]:
        """The models served now (a fresh read, kept for the memo)."""
        read_at = self._clock()
        served = self._read()
        with self._lock:
            if read_at >= self._read_at:
                self._served, self._read_at = served, read_at
        return served


def page_models(served: Mapping[str, int], default: str) -> list[str]:
    """The models a client may choose now: the served ones, `default` first when served."""
    known = sorted(model for model in served if model in defaults.MODELS)
    return sorted(known, key=lambda model: model != default)
