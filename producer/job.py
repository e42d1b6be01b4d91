"""A submitted image as the producer sees it: where its result is, how to wait for it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bgq import defaults
from bgq.contract import INTERACTIVE, TaskArgs, result_name
from bgq.errors import BgqError, JobFailed, JobTimeout, PermanentError
from bgq.store import Store

Location = Path | str  # a result's local Path (filesystem store) or its s3:// URL


class Tracker(Protocol):
    """What a Job needs from whoever submitted it (a Producer): its state, and a requeue."""

    def task_meta(self, key: str) -> dict[str, Any]:
        """The task's state as Celery stored it (status, result or exception)."""
        ...

    def requeue_if_lost(
        self, args: TaskArgs, lane: str = INTERACTIVE, run: str | None = None
    ) -> bool:
        """Enqueue the job again (in its lane) if nobody holds it; True if its result is in
        the store."""
        ...


@dataclass
class Job:
    """One submitted image: its cache key, whether it was a cache hit, and how to wait for it.

    `wait()` returns where the result is (a local Path on a filesystem store, its s3:// URL on
    S3); `read()` and `save(path)` work the same on both.
    """

    key: str
    cached: bool
    store: Store | None = field(default=None, repr=False)
    producer: Tracker | None = field(default=None, repr=False)
    error: BgqError | None = None
    source: str | None = None
    args: TaskArgs | None = field(default=None, repr=False)
    done: bool = False
    lane: str = INTERACTIVE
    run: str | None = None

    @property
    def output(self) -> str:
        """The result's name in the store (its key and its format's extension)."""
        return self.args.output if self.args is not None else result_name(self.key)

    @property
    def location(self) -> Location:
        assert self.store is not None
        return self.store.location(self.output)

    def poll(self) -> Location | None:
        """Where the result is if it is ready, else None; raise JobFailed if the job failed."""
        if self.error is not None:
            raise self.error
        if self.cached or self.done:
            return self.location
        assert self.producer is not None
        return self.update(self.producer.task_meta(self.key))

    def update(self, meta: dict[str, Any], check_lost: bool = True) -> Location | None:
        """Apply the task's state as Celery stored it (one poll, or one of a batch).

        The store is asked only when the task failed (a result in the store wins over a failed
        state), or when a pending job lost its guard (its result may be there already; else it
        is enqueued again); success needs no lookup, the worker wrote the result first.
        """
        assert self.store is not None and self.producer is not None
        status = meta["status"]
        if status in ("FAILURE", "REVOKED") and self.store.has_output(self.output):
            self.done = True  # the result is there: e.g. only storing the state failed (outage)
        elif status == "FAILURE":
            exc = meta["result"]
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise JobFailed(self.key, reason, permanent=isinstance(exc, PermanentError))
        elif status == "REVOKED":
            raise JobFailed(self.key, "the job was revoked")
        elif status == "SUCCESS":
            self.done = True  # the worker wrote the result before its state: no lookup needed
        elif status == "PENDING" and check_lost and self.args is not None:
            self.done = self.producer.requeue_if_lost(self.args, self.lane, self.run)
        return self.location if self.done else None

    def wait(self, timeout: float | None = None) -> Location:
        """Block until the result is in the store and say where; raise on failure or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = defaults.JOB_POLL_FIRST
        while True:
            location = self.poll()
            if location is not None:
                return location
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.key} not finished after {timeout:g}s")
            time.sleep(
                delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            )
            delay = min(defaults.JOB_POLL_MAX, delay * 2)

    def read(self, timeout: float | None = None) -> bytes:
        """Wait for the result and return its bytes (any store)."""
        self.wait(timeout)
        assert self.store is not None
        return self.store.read_output(self.output)

    def save(self, dest: str | os.PathLike[str], timeout: float | None = None) -> Path:
        """Wait for the result and write it to the local path `dest` atomically (any store)."""
        self.wait(timeout)
        assert self.store is not None
        self.store.save(self.output, Path(dest))
        return Path(dest)
