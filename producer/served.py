"""Which models the live workers serve, as a producer sees them: a job for a model that no live
worker serves in the job's lane is refused at once (`ModelNotServed`) instead of waiting in a
queue for nobody (a worker that serves u2net in the interactive lane only never takes a bulk
u2net job). An interactive submit that promotes a waiting bulk job is held to the same rule:
its interactive copy needs a worker of the model in the interactive lane.

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

from bgq import contract, defaults, lanes
from bgq.errors import ModelNotServed
from bgq.lanes import Node


class ServedModels:
    """The models live workers serve, by lane, from their capacity entries read through `read`."""

    def __init__(
        self,
        read: Callable[[], Mapping[str, Node]],
        memo: float = defaults.SERVED_MEMO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`memo`: seconds a "served" answer is trusted (math.inf: checked once, as ingest
        does); `clock` is the monotonic clock the memo ages by."""
        self._read = read
        self._memo = memo
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: Mapping[str, Node] = {}
        self._read_at = -float("inf")

    def require(self, model: str, lane: str = contract.INTERACTIVE) -> None:
        """Return if some live worker serves `model` in `lane`, else raise ModelNotServed
        (read fresh)."""
        with self._lock:
            fresh = self._clock() - self._read_at < self._memo
            if fresh and model in lanes.served_models(self._nodes, lane):
                return
        nodes = self._fresh()
        if model not in lanes.served_models(nodes, lane):
            others = [
                other for other in contract.LANES if model in lanes.served_models(nodes, other)
            ]
            raise ModelNotServed(model, lanes.served_models(nodes), lane, ", ".join(others))

    def serves(self, model: str, lane: str) -> bool:
        """Whether some live worker serves `model` in `lane` now (a fresh read)."""
        return model in lanes.served_models(self._fresh(), lane)

    def current(self) -> dict[str, int]:
        """The models served now in any lane, and their pool processes (a fresh read)."""
        return lanes.served_models(self._fresh())

    def _fresh(self) -> Mapping[str, Node]:
        """The workers' entries read now, kept for the memo."""
        read_at = self._clock()
        nodes = self._read()
        with self._lock:
            if read_at >= self._read_at:
                self._nodes, self._read_at = nodes, read_at
        return nodes


def page_models(served: Mapping[str, int], default: str) -> list[str]:
    """The models a client may choose now: the served ones, `default` first when served."""
    known = sorted(model for model in served if model in defaults.MODELS)
    return sorted(known, key=lambda model: model != default)
