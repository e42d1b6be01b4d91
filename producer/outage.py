"""Riding out a Redis outage or failover: retry for a budget of seconds, then fail clearly."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

from bgq import defaults
from bgq.errors import BrokerError

T = TypeVar("T")

log = logging.getLogger("producer")

# Connection refused or reset, a timeout, a server still loading its AOF, a demoted master.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, OperationalError)


@contextlib.contextmanager
def broker_errors(doing: str) -> Iterator[None]:
    """Report Redis trouble as a (transient) BrokerError saying what was being done."""
    try:
        yield
    except (redis.RedisError, OperationalError) as exc:
        raise BrokerError(f"cannot {doing}: {exc}") from exc


def is_outage(exc: BrokerError) -> bool:
    """Whether a Redis failure looks like an outage or a failover (worth waiting out), not bad
    credentials or a bad command."""
    cause = exc.__cause__
    if isinstance(cause, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    return isinstance(cause, OUTAGE_ERRORS)


class Outage:
    """One producer's view of the broker's outages: when the current one began, said once.

    Only a broker that answered before can have an outage: one never reached (a wrong URL,
    nothing started yet) fails at once, as it always did.
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget  # seconds of retrying from the outage's start
        self._lock = threading.Lock()
        self._since: float | None = None
        self._reached = False  # whether an operation ever succeeded

    def call(self, doing: str, operation: Callable[[], T]) -> T:
        """Run a Redis operation; through an outage retry it (exponential backoff, full jitter)
        until `budget` seconds after the outage began, then raise its BrokerError."""
        for attempt in itertools.count():
            try:
                with broker_errors(doing):
                    result = operation()
            except BrokerError as exc:
                left = self._left(exc)
                if left <= 0:
                    raise
                ceiling = min(defaults.BROKER_RETRY_MAX, defaults.BROKER_RETRY_BASE * 2**attempt)
                time.sleep(min(left, random.uniform(0, ceiling)))
                continue
            self._reached = True
            if self._since is not None:
                self._over()
            return result
        raise AssertionError("unreachable")

    def _left(self, exc: BrokerError) -> float:
        """Seconds of retrying left for this failure (0: give up); says once that it waits."""
        if not self._reached or not is_outage(exc) or self.budget <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            first = self._since is None
            since = self._since = now if self._since is None else self._since
        if first:
            log.warning("broker unreachable, retrying for up to %g s", self.budget)
        return since + self.budget - now

    def _over(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.info("broker reachable again after %.1f s", time.monotonic() - since)
