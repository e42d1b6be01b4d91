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
from kombu.exceptions import OperationalError

from bgq import contract, defaults, jobs, lanes
from bgq.contract import Counter, TaskArgs
from bgq.errors import BrokerError, NotInStore, OutOfMemory, TransientError, WorkerCrashed
from workers import backgrounds, handoff, imaging, masks, session, shaping
from workers.app import app, app_store, settings
from workers.leases import LeasedTask
from workers.retry import retry_later

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
        background = backgrounds.open_background(store, args.options, settings.max_megapixels)
        lap("read")
        img = imaging.decode(
            data,
            settings.max_megapixels,
            args.options,
            settings.max_memory_per_child_mb,
            background,
            session.loaded() | {args.model},  # the task's model with those already loaded here
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
            cutout, args.options, settings.png_encoder, settings.png_compress_level, background
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


def _check_starts(key: str) -> None:
    """Refuse a job that killed its pool process MAX_DELIVERIES times (counted by the worker's
    main process, workers/leases.py), or that started MAX_STARTS times without finishing (its
    whole worker lost each time, which no process lived to count). Both clear at its end."""
    try:
        with app.backend.client.pipeline() as pipe:
            pipe.incr(contract.starts_key(key))
            pipe.expire(contract.starts_key(key), defaults.RESULT_TTL)
            pipe.get(contract.attempts_key(key))
            starts, _, deaths = pipe.execute()
    except redis.RedisError as exc:
        raise BrokerError(f"cannot count deliveries: {exc}") from exc
    if int(deaths or 0) >= defaults.MAX_DELIVERIES:
        raise WorkerCrashed(
            f"the worker process died {int(deaths)} times on this job "
            "(crash or out of memory); not trying again"
        )
    if int(starts) > defaults.MAX_STARTS:
        raise WorkerCrashed(
            f"this job started {int(starts) - 1} times without finishing (its worker was lost "
            "each time: host gone, or the whole worker killed); not trying again"
        )


def _started(request: Any) -> None:
    """A job starts: record how long its first delivery waited in its lane (not a retry's or a
    redelivery's: their wait includes an earlier run), and if it is a bulk job, let the next
    waiting one in (so the bulk queue stays one cluster deep). Best effort."""
    lane = handoff.lane_of(request)
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


# KEYS: counted mark, guard, stats, callbacks[, input refs...]; ARGV: this run's enqueue token
# ('' if none), its outcome (a stats field), the task id, the mark's TTL. Counts a job's end
# once per enqueue: a second run of the same enqueue (a holder back after its lease was taken
# over) counts nothing. Releases the guard if it is still this enqueue's (a promotion or a newer
# enqueue may own it), takes this run's webhooks, and drops the job from the reference sets of
# the inputs it needed (its image, its bg_image). Returns the webhooks; false if counted before.
FINISH = """
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[1]) == ARGV[1] then return false end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
end
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
if ARGV[1] == '' or redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local urls = redis.call('SMEMBERS', KEYS[4])
redis.call('DEL', KEYS[4])
for i = 5, #KEYS do redis.call('SREM', KEYS[i], ARGV[3]) end
return urls
"""


def enqueue_token(request: Any) -> str:
    """The guard token of the enqueue that sent this task ('' for a task sent otherwise)."""
    token = request.get(contract.GUARD_HEADER) or (request.headers or {}).get(contract.GUARD_HEADER)
    return token if isinstance(token, str) else ""


class RemovalTask(LeasedTask):
    """Records each outcome once Celery has stored the task's state."""

    counts_deaths = True  # a pool process that dies with this task counts against the job
    counts_starts = True  # _check_starts

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Any,
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        """Clear the death and start counters; on a final state also count it once and release
        the guard.

        Running after the state is stored means that a producer which wins the guard next can
        never be answered by this run's state.
        """
        outcome: Counter | None = None  # RETRY: the job goes on, keep the guard
        if status == "SUCCESS":
            outcome = Counter.COMPUTED if retval.get("computed") else Counter.SKIPPED
        elif status == "FAILURE":
            outcome = Counter.FAILED
        urls: list[bytes] | None = None
        try:
            client = app.backend.client
            client.delete(contract.attempts_key(task_id), contract.starts_key(task_id))
            if outcome:
                urls = self._finish(client, task_id, kwargs, outcome)
            if urls is not None and outcome == Counter.COMPUTED:
                with client.pipeline(transaction=False) as pipe:
                    observe_stages(pipe, retval.get("seconds", {}))
                    if retval.get("inferred"):
                        pipe.hincrby(contract.STATS_KEY, Counter.INFERENCES, 1)
                    pipe.execute()
        except redis.RedisError as exc:
            log.warning(
                "could not record %s of %s (the guard expires by itself): %s", status, task_id, exc
            )
        if urls:
            self._notify(task_id, status, retval, sorted(u.decode() for u in urls))

    def _finish(
        self, client: redis.Redis, task_id: str, kwargs: dict[str, Any], outcome: Counter
    ) -> list[bytes] | None:
        """Count this end (FINISH); its webhooks' URLs, or None if it was counted before."""
        keys = [
            contract.counted_key(task_id),
            contract.guard_key(task_id),
            contract.STATS_KEY,
            contract.callbacks_key(task_id),
        ]
        keys += [contract.input_refs_key(sha) for sha in contract.needed_inputs(kwargs)]
        token = enqueue_token(self.request)
        urls = client.eval(FINISH, len(keys), *keys, token, outcome, task_id, defaults.RESULT_TTL)
        if urls is None:
            log.info("%s was counted already (run twice: a lease was taken over)", task_id)
        return urls

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


# Connectivity to Redis (the guard, the masks' lock, counters) raised by redis-py as is.
REDIS_FAULTS = (redis.ConnectionError, redis.TimeoutError)


@app.task(
    name=contract.TASK_NAME,
    base=RemovalTask,
    bind=True,
    max_retries=None,  # infrastructure faults retry until they clear (retry_later)
)
def remove_background(self: Task, **kwargs: Any) -> dict[str, Any]:
    """Remove the background of the input blob named by the (JSON) task arguments."""
    _hand_on_unless_served(self, kwargs.get("model"))
    _started(self.request)
    try:
        args = TaskArgs.from_kwargs(kwargs)
        _check_starts(args.key)
        return process(args)
    except NotInStore as exc:
        # Its input may never appear (pruned, or never written): bounded, then the job fails.
        if self.request.retries >= defaults.TASK_MAX_RETRIES:
            raise
        retry_later(self, exc)
    except (TransientError, *REDIS_FAULTS) as exc:
        retry_later(self, exc)  # the store or Redis is out of reach: never the job's fault
    except MemoryError:
        # Raised as is, Celery would treat it as unrecoverable and stop the whole worker.
        raise OutOfMemory(
            "ran out of memory processing this image; lower BGQ_MAX_MEGAPIXELS or "
            "BGQ_CONCURRENCY, or give the workers more memory"
        ) from None


def _hand_on_unless_served(task: Task, model: object) -> None:
    """A job for a model this worker does not serve (a rolling upgrade's) goes on to its
    model's queue, unrun (workers/handoff.py); a publish that fails is retried as a fault."""
    target = isinstance(model, str) and handoff.destination(task.request, model, session.served())
    if target:
        try:
            handoff.hand_on(task, target)
        except (OperationalError, *REDIS_FAULTS) as exc:
            retry_later(task, exc)
