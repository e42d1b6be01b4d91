"""Retries shared by bgq's tasks: their delays, and a retry that survives a failed publish."""

from __future__ import annotations

import logging
import random
from typing import NoReturn

from celery import Task
from celery.exceptions import Reject

from bgq import defaults

log = logging.getLogger(__name__)


def backoff(
    retries: int, cap: float = defaults.RETRY_BACKOFF_MAX, base: float = defaults.RETRY_BACKOFF_BASE
) -> float:
    """Seconds before retry number `retries` + 1: exponential, capped, with full jitter."""
    ceiling = min(cap, base * 2**retries)
    return random.uniform(0, ceiling)


def retry_later(task: Task, exc: Exception) -> NoReturn:
    """Retry after a capped, jittered backoff (see `retry_or_requeue`)."""
    log.warning("transient failure of %s, retrying: %s", task.request.id, exc)
    retry_or_requeue(task, exc, backoff(task.request.retries))


def retry_or_requeue(task: Task, exc: Exception, countdown: float) -> NoReturn:
    """Retry in `countdown` s. If the retry cannot be published (Redis out of reach), Celery
    would reject the message for good and store FAILURE: requeue it instead (if even that
    cannot reach Redis, the message stays unacknowledged and its lease brings it back)."""
    try:
        raise task.retry(exc=exc, countdown=countdown)
    except Reject as rejected:
        raise Reject(rejected.reason, requeue=True) from exc
