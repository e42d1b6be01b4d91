"""The `bgq.remove_background` task: input blob in the store -> result image in the store.

The model's masks of (input, model) are kept in the store too: a variant of an input already
seen (another format, canvas or crop) is derived from them without running the model.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery import Task

from bgq import contract, defaults, jobs, lanes
from bgq.contract import Counter, TaskArgs
from bgq.errors import BrokerError, OutOfMemory, TransientError, WorkerCrashed
from workers import imaging, masks, session, shaping
from workers.app import app, app_store, settings
from workers.retry import backoff

log = logging.getLogger(__name__)


def process(args: TaskArgs) -> dict[str, Any]:
    """Compute one result unless the store already has it; return what was done and how long."""
    store = app_store()
    seconds: dict[str, float] = {}
    computed = not store.has_output(args.output)
    inferred = False
    if computed:
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = round(now - clock, 4)
            clock = now

        data = store.read_input(args.input_sha256)
        lap("read")
        img = imaging.decode(
            data, settings.max_megapixels, args.options, settings.max_memory_per_child_mb
        )
        lap("decode")
        source = masks.MaskSource(
            store,
            args.masks,
            lambda: session.get(args.model, settings),
            app.backend.client,
            owner=args.key,
        )
        cutout = imaging.remove_background(img, source, args.options)
        del img  # only the cutout stays in memory while it is encoded
        inferred = source.inferred
        lap("inference")  # rembg.remove: masks (stored, or the model's), cutout
        data = shaping.render(
            cutout, args.options, settings.png_encoder, settings.png_compress_level
        )
        lap("encode")  # shaping and encoding
        store.put_output(args.output, data)
        lap("write")
    return {
        "key": args.key,
        "output": str(store.location(args.output)),
        "computed": computed,
        "inferred": inferred,
        "pid": os.getpid(),
        "seconds": seconds,
    }


def _count_delivery(key: str) -> None:
    """Refuse a job that already killed its worker MAX_DELIVERIES times (no crash loops).

    The counter is cleared whenever the task ends normally, so only deaths accumulate.
    """
    try:
        with app.backend.client.pipeline() as pipe:
            pipe.incr(contract.attempts_key(key))
            pipe.expire(contract.attempts_key(key), defaults.RESULT_TTL)
            deliveries = int(pipe.execute()[0])
    except redis.RedisError as exc:
        raise BrokerError(f"cannot count deliveries: {exc}") from exc
    if deliveries > defaults.MAX_DELIVERIES:
        raise WorkerCrashed(
            f"the worker process died {deliveries - 1} times on this job "
            "(crash or out of memory); not trying again"
        )


def lane_of(request: Any) -> str:
    """The lane a task came from: its queue (a retry keeps it), whatever its headers say."""
    routing_key = (request.delivery_info or {}).get("routing_key") or ""
    bulk = routing_key == contract.BULK_QUEUE or routing_key.startswith(contract.run_queue(""))
    return contract.BULK if bulk else contract.INTERACTIVE


def _started(request: Any) -> None:
    """A job starts: record how long its first delivery waited in its lane (not a retry's or a
    redelivery's: their wait includes an earlier run), and if it is a bulk job, let the next
    waiting one in (so the bulk queue stays one cluster deep). Best effort."""
    lane = lane_of(request)
    enqueued = request.get(contract.ENQUEUED_HEADER)
    first = not request.retries and not (request.delivery_info or {}).get("redelivered")
    try:
        with app.backend.client.pipeline(transaction=False) as pipe:
            if isinstance(enqueued, int | float) and first:
                lanes.observe_wait(pipe, lane, time.time() - enqueued)
            if lane == contract.BULK:
                lanes.dispatch_on(pipe)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not record the start of %s: %s", request.id, exc)


def observe_stages(pipe: Any, seconds: dict[str, float]) -> None:
    """Add one computed result's stage times to the histograms in Redis (all pool processes
    and all worker machines add to the same ones; the exporter reads them)."""
    for stage, value in seconds.items():
        bound = next((b for b in contract.STAGE_BUCKETS if value <= b), None)
        key = contract.stage_key(stage)
        pipe.hincrby(key, f"le:{bound:g}" if bound is not None else "le:+Inf", 1)
        pipe.hincrbyfloat(key, "sum", value)
        pipe.hincrby(key, "count", 1)


class RemovalTask(Task):
    """Records each outcome once Celery has stored the task's state."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Any,
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        """Clear the delivery counter; on a final state also count it and release the guard.

        Running after the state is stored means that a producer which wins the guard next can
        never be answered by this run's state.
        """
        outcome: Counter | None = None  # RETRY: the job goes on, keep the guard
        urls: list[bytes] = []
        callbacks_at = -1  # index of the callbacks' SMEMBERS reply in the pipeline
        if status == "SUCCESS":
            outcome = Counter.COMPUTED if retval.get("computed") else Counter.SKIPPED
        elif status == "FAILURE":
            outcome = Counter.FAILED
        try:
            with app.backend.client.pipeline() as pipe:
                pipe.delete(contract.attempts_key(task_id))
                if outcome:
                    pipe.hincrby(contract.STATS_KEY, outcome, 1)
                    pipe.delete(contract.guard_key(task_id))
                    # This run's webhooks, taken with the guard's release: once a new run can
                    # start, callbacks registered for it are no longer this run's to send.
                    callbacks_at = len(pipe)
                    pipe.smembers(contract.callbacks_key(task_id))
                    pipe.delete(contract.callbacks_key(task_id))
                    if isinstance(kwargs.get("input_sha256"), str):
                        pipe.srem(contract.input_refs_key(kwargs["input_sha256"]), task_id)
                if outcome == Counter.COMPUTED:
                    observe_stages(pipe, retval.get("seconds", {}))
                    if retval.get("inferred"):
                        pipe.hincrby(contract.STATS_KEY, Counter.INFERENCES, 1)
                replies = pipe.execute()
            if callbacks_at >= 0:
                urls = sorted(replies[callbacks_at])
        except redis.RedisError as exc:
            log.warning(
                "could not record %s of %s (the guard expires by itself): %s", status, task_id, exc
            )
        if urls:
            self._notify(task_id, status, retval, [u.decode() for u in urls])

    def _notify(self, task_id: str, status: str, retval: Any, urls: list[str]) -> None:
        """Queue this run's webhooks, now that its final state is stored: their body's
        finished_at is that state's date_done, read back, as `GET /v1/jobs/{id}` shows it."""
        try:
            record = jobs.read_record(app.backend.client, task_id)
            stored = app.backend.get_task_meta(task_id, cache=False)
            done_at = jobs.finished_at(stored) or jobs.iso()  # no state stored: now
            job = (
                jobs.view(task_id, "done", record, finished_at=done_at)
                if status == "SUCCESS"
                else jobs.view(task_id, "failed", record, jobs.error_line(retval), done_at)
            )
            jobs.send_webhooks(app, urls, job)
        except Exception:
            log.exception("could not queue the webhooks of %s", task_id)


@app.task(
    name=contract.TASK_NAME,
    base=RemovalTask,
    bind=True,
    max_retries=defaults.TASK_MAX_RETRIES,
)
def remove_background(self: Task, **kwargs: Any) -> dict[str, Any]:
    """Remove the background of the input blob named by the (JSON) task arguments."""
    _started(self.request)
    try:
        args = TaskArgs.from_kwargs(kwargs)
        _count_delivery(args.key)
        return process(args)
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            raise
        log.warning("transient failure of %s, retrying: %s", kwargs.get("key"), exc)
        raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc
    except MemoryError:
        # Raised as is, Celery would treat it as unrecoverable and stop the whole worker.
        raise OutOfMemory(
            "ran out of memory processing this image; lower BGQ_MAX_MEGAPIXELS or "
            "BGQ_CONCURRENCY, or give the workers more memory"
        ) from None
