"""A Job needs only a Tracker (task_meta, requeue_if_lost), not a Producer: unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bgq.contract import BULK, INTERACTIVE, TaskArgs
from bgq.errors import InvalidImage, JobFailed
from bgq.options import Options
from bgq.store import FileStore
from producer.job import Job, Tracker


class Script:
    """A Tracker that answers a scripted sequence of task states and records the requeues."""

    def __init__(self, *states: dict[str, Any], found: bool = False) -> None:
        self.states = list(states)
        self.found = found  # what requeue_if_lost says: the result is in the store already
        self.requeued: list[str] = []

    def task_meta(self, key: str) -> dict[str, Any]:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def requeue_if_lost(
        self, args: TaskArgs, lane: str = INTERACTIVE, run: str | None = None
    ) -> bool:
        self.requeued.append(f"{args.key} {lane} {run}")
        return self.found


def job_on(tracker: Tracker, store: FileStore, **lane: str) -> Job:
    args = TaskArgs.build("ab" * 32, "u2netp", Options())
    return Job(args.key, False, store, tracker, args=args, **lane)


def test_a_job_waits_through_its_tracker(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    tracker = Script({"status": "PENDING"}, {"status": "STARTED"}, {"status": "SUCCESS"})
    job = job_on(tracker, store)
    assert job.wait(timeout=5) == store.location(job.output)
    assert tracker.requeued == [f"{job.key} interactive None"]  # was the pending job lost?


def test_a_bulk_job_is_requeued_in_its_lane_and_run(tmp_path: Path) -> None:
    tracker = Script({"status": "PENDING"})
    job = job_on(tracker, FileStore(tmp_path / "store"), lane=BULK, run="spring")
    assert job.poll() is None
    assert tracker.requeued == [f"{job.key} bulk spring"]


def test_a_lost_job_found_in_the_store_is_done(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    job = job_on(Script({"status": "PENDING"}, found=True), store)
    assert job.poll() == store.location(job.output)


def test_a_failed_state_raises_with_its_reason(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    job = job_on(Script({"status": "FAILURE", "result": InvalidImage("not an image")}), store)
    with pytest.raises(JobFailed, match="InvalidImage: not an image") as failure:
        job.poll()
    assert failure.value.permanent
