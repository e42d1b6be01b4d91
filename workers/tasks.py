"""The `bgq.remove_background` task: input blob in the store -> result PNG in the store."""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import redis
from celery import Task

from bgq import contract, defaults
from bgq.contract import TaskArgs
from bgq.errors import TransientError, WorkerCrashed
from bgq.store import Store
from workers import imaging, session
from workers.app import app, settings

log = logging.getLogger(__name__)


def backoff(retries: int) -> float:
    """Seconds before retry number `retries` + 1: exponential, capped, with full jitter."""
    ceiling = min(defaults.RETRY_BACKOFF_MAX, defaults.RETRY_BACKOFF_BASE * 2**retries)
    return random.uniform(0, ceiling)


def process(args: TaskArgs) -> dict[str, Any]:
    """Compute one result unless the store already has it; return what was done and how long."""
    store = Store(settings.store_dir)
    out = store.output_path(args.key)
    seconds: dict[str, float] = {}
    computed = not out.is_file()
    if computed:
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = round(now - clock, 4)
            clock = now

        data = store.read_input(args.input_sha256)
        lap("read")
        img = imaging.decode(data, settings.max_megapixels, args.options)
        lap("decode")
        model = session.get(args.model, settings)
        cutout = imaging.remove_background(img, model, args.options)
        lap("remove")
        png = imaging.encode_png(cutout, settings.png_compress_level)
        lap("encode")
        store.put_output(args.key, png)
        lap("write")
    return {
        "key": args.key,
        "output": str(out),
        "computed": computed,
        "pid": os.getpid(),
        "seconds": seconds,
    }


def _count_delivery(key: str) -> None:
    """Refuse a job that already killed its worker MAX_DELIVERIES times (no crash loops).

    The counter is cleared whenever the task ends normally, so only deaths accumulate.
    """
    client = app.backend.client
    with client.pipeline() as pipe:
        pipe.incr(contract.attempts_key(key))
        pipe.expire(contract.attempts_key(key), defaults.RESULT_TTL)
        deliveries = int(pipe.execute()[0])
    if deliveries > defaults.MAX_DELIVERIES:
        raise WorkerCrashed(
            f"the worker process died {deliveries - 1} times on this job "
            "(crash or out of memory); not trying again"
        )


def _finish(key: str | None, outcome: str | None) -> None:
    """Count the outcome and release the enqueue guard; best effort, the guard also expires."""
    try:
        client = app.backend.client
        with client.pipeline() as pipe:
            if outcome:
                pipe.hincrby(contract.STATS_KEY, outcome, 1)
            if key:
                pipe.delete(contract.attempts_key(key))
                if outcome:
                    pipe.delete(contract.guard_key(key))
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not record outcome %s of %s: %s", outcome, key, exc)


@app.task(name=contract.TASK_NAME, bind=True, max_retries=defaults.TASK_MAX_RETRIES)
def remove_background(self: Task, **kwargs: Any) -> dict[str, Any]:
    """Remove the background of the input blob named by the (JSON) task arguments."""
    key = kwargs.get("key") if isinstance(kwargs.get("key"), str) else None
    try:
        args = TaskArgs.from_kwargs(kwargs)
        _count_delivery(args.key)
        result = process(args)
    except TransientError as exc:
        if self.request.retries < self.max_retries:
            log.warning("transient failure of %s, retrying: %s", key, exc)
            _finish(key, None)
            raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc
        _finish(key, "failed")
        raise
    except Exception:
        _finish(key, "failed")
        raise
    _finish(args.key, "computed" if result["computed"] else "skipped")
    return result
