"""The job routes of `bgq api` under /v1: submit (waiting or not), a job's status, its result.

Hashing, the cache short-circuit, the enqueue guard and the store are the Producer's; these
routes speak HTTP: the job views, webhooks' registration, the result's headers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from bgq import contract, defaults, jobs, webhooks
from bgq.options import Options
from bgq.settings import Settings
from bgq.store import Store
from producer.api import ratelimit
from producer.api.deps import (
    LimiterDep,
    MetricsDep,
    ProducerDep,
    SettingsDep,
    StoreDep,
    require_key,
)
from producer.api.errors import ApiError
from producer.api.metrics import Metrics
from producer.api.openapi import KEY_PATTERN
from producer.api.ratelimit import Limiter
from producer.api.submission import image_of, lane_of, options_of, read_submission, wait_seconds
from producer.client import Producer
from producer.job import Job

log = logging.getLogger("bgq.api")

KEY_RE = re.compile(KEY_PATTERN)  # what the schema says a job id is
IMMUTABLE = "public, max-age=31536000, immutable"

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


@router.post(
    "/remove",
    summary="Remove the background; the result if ready within `wait`, else 202 with the job",
    operation_id="remove",
    response_class=FileResponse,
)
async def remove(
    request: Request,
    settings: SettingsDep,
    producer: ProducerDep,
    metrics: MetricsDep,
    limiter: LimiterDep,
) -> Response:
    fields, data = await read_submission(request, settings)
    wait = wait_seconds(fields)
    if "callback_url" in fields:
        raise ApiError(422, "invalid_request", "callback_url belongs to POST /v1/jobs")
    sent = Submission(request, settings, producer, metrics, limiter)
    job = await sent.submit(fields, data, callback=None, record_hits=False)
    if not (job.cached or await wait_for(request, job, wait)):
        response: Response = job_response(request, settings, job.key, "queued", cached=False)
    else:
        response = await image_response(producer.store, job.output, job.cached)
    response.headers.update(sent.limit_headers)
    return response


@router.post(
    "/jobs",
    summary="Submit an asynchronous job (optionally with a webhook)",
    operation_id="create_job",
    status_code=202,
)
async def create_job(
    request: Request,
    settings: SettingsDep,
    producer: ProducerDep,
    metrics: MetricsDep,
    limiter: LimiterDep,
) -> JSONResponse:
    fields, data = await read_submission(request, settings)
    if "wait" in fields:
        raise ApiError(422, "invalid_request", "wait belongs to POST /v1/remove")
    callback = fields.get("callback_url")
    sent = Submission(request, settings, producer, metrics, limiter)
    job = await sent.submit(fields, data, callback=callback, record_hits=True)
    status = "done" if job.cached else "queued"
    response = job_response(request, settings, job.key, status, job.cached)
    response.headers.update(sent.limit_headers)
    return response


@router.get(
    "/jobs/{job_id}",
    summary="A job's status",
    operation_id="get_job",
    response_model=jobs.JobView,
)
async def get_job(
    job_id: str, request: Request, settings: SettingsDep, producer: ProducerDep
) -> jobs.JobView:
    key = known_key(job_id)
    job = await run_in_threadpool(describe, producer, key)
    if job is None:
        raise ApiError(404, "not_found", f"no job {key}")
    if job.result_url and job.result_url.startswith("/"):  # no record (e.g. a Python caller)
        job.result_url = base_url(request, settings) + job.result_url
    if job.status == "queued":
        record = await run_in_threadpool(jobs.read_record, producer.app.backend.client, key)
        args = jobs.record_args(record)
        if args is not None:
            lane, run = jobs.record_lane(record)
            await run_in_threadpool(producer.requeue_if_lost, args, lane, run)
    return job


@router.get(
    "/jobs/{job_id}/result",
    summary="A finished job's result (immutable; ETag is the job id)",
    operation_id="get_result",
    response_class=FileResponse,
)
async def get_result(
    job_id: str, request: Request, settings: SettingsDep, producer: ProducerDep, store: StoreDep
) -> Response:
    key = known_key(job_id)
    output = await run_in_threadpool(store.use_result, key)
    if output is not None:
        if request.headers.get("if-none-match") == f'"{key}"':
            return Response(status_code=304, headers={"ETag": f'"{key}"'})
        if settings.result_redirect == "presigned":
            url = await run_in_threadpool(store.presigned_url, output, settings.presign_seconds)
            if url is not None:
                return RedirectResponse(url, status_code=307)
        return await image_response(store, output, cached=True)
    job = await run_in_threadpool(describe, producer, key)
    if job is None:
        raise ApiError(404, "not_found", f"no job {key}")
    if job.status == "failed":
        raise ApiError(409, "job_failed", f"the job failed: {job.error}")
    raise ApiError(409, "not_ready", f"the job is {job.status}; try again later")


# -- what the routes share ----------------------------------------------------------------------


class Submission:
    """One submission: validated, counted against the caller's limits, handed to the Producer,
    and recorded for GET /v1/jobs; `limit_headers` says where the caller stands."""

    def __init__(
        self,
        request: Request,
        settings: Settings,
        producer: Producer,
        metrics: Metrics,
        limiter: Limiter,
    ) -> None:
        self.request = request
        self.settings = settings
        self.producer = producer
        self.metrics = metrics
        self.limiter = limiter
        self.caller: str | None = request.state.caller  # the key's short id (require_key)
        self.limit_headers: dict[str, str] = {}
        self.image: bytes | None = None  # the image as submitted (uploaded or fetched)
        self.usages: list[ratelimit.Usage] | None = None  # once counted

    async def count(self, lane: str) -> list[ratelimit.Usage]:
        """Count the request against the caller's limits in `lane` (429 over them), once: a
        route that fetches or stores before submitting calls this first."""
        self.usages = await run_in_threadpool(self.limiter.count_request, self.caller, lane)
        self.limit_headers = ratelimit.headers(self.usages)
        return self.usages

    async def submit(
        self,
        fields: dict[str, str],
        upload: bytes | None,
        *,
        callback: str | None,
        record_hits: bool,
        parsed: tuple[str, Options] | None = None,
    ) -> Job:
        """Count the request (unless `count` did), read the image, then submit it as one of the
        caller's jobs (with the model and options of `fields`, or `parsed` where a route parsed
        its own)."""
        lane = lane_of(fields)
        usages = self.usages if self.usages is not None else await self.count(lane)
        data = await image_of(self.request, self.settings, fields, upload)  # after the count
        self.image = data
        model, options = parsed or options_of(fields, self.settings.model)
        if callback is not None:
            await run_in_threadpool(check_callback, self.settings, callback)
            if not self.settings.webhook_secret:
                raise ApiError(
                    422, "invalid_request", "callback_url needs BGQ_WEBHOOK_SECRET to be set"
                )
        job = await run_in_threadpool(self.enqueue, data, model, options, lane, usages)
        self.metrics.cache.labels("hit" if job.cached else "miss").inc()
        if record_hits or not job.cached:  # a job to look up later (a hit needs none)
            base = base_url(self.request, self.settings)
            run = ratelimit.run_of(self.caller)
            await run_in_threadpool(record, self.producer, job, base, callback, lane, run)
        return job

    def enqueue(
        self, data: bytes, model: str, options: Options, lane: str, usages: list[ratelimit.Usage]
    ) -> Job:
        """Submit the image in `lane`, held to the caller's limit of jobs outstanding there."""
        run = ratelimit.run_of(self.caller)
        caller = self.caller
        if caller is None or "jobs" not in self.limiter.limits(caller, lane):
            return self.producer.submit_data(data, model, options, lane=lane, run=run)
        key = contract.cache_key(contract.input_digest(data), model, options)
        name = contract.result_name(key, options.format)
        held = self.limiter.hold_job(
            caller, lane, key, lambda: self.producer.store.has_output(name), usages
        )
        if held is None:  # over the limit, but the result is stored: a hit costs nothing
            return self.producer.submit_data(data, model, options, lane=lane, run=run)
        self.limit_headers = ratelimit.headers([*usages, held])
        outstanding = False
        try:
            job = self.producer.submit_data(data, model, options, lane=lane, run=run)
            outstanding = not job.cached
        finally:
            self.limiter.release_job(caller, lane, key, outstanding)
        return job


def check_callback(settings: Settings, url: str) -> None:
    """Refuse a malformed or non-public callback; a host that does not resolve may later."""
    try:
        webhooks.check_callback_url(url, settings.webhook_allow_private)
    except webhooks.CallbackUnresolvable as exc:
        log.info("accepted %s; its deliveries are retried", exc)


def record(
    producer: Producer, job: Job, base: str, callback: str | None, lane: str, run: str
) -> None:
    """Register the job (its base URL, callback, lane and run); a callback of a job already
    over is sent."""
    assert job.args is not None
    client = producer.app.backend.client
    jobs.register(client, job.args, base, callback, lane=lane, run=run)
    if callback:
        jobs.notify_if_final(producer.app, client, describe(producer, job.key))


def describe(producer: Producer, key: str) -> jobs.JobView | None:
    """The job's view from its record, its task's state and the store; None if unknown."""
    client = producer.app.backend.client
    record = jobs.read_record(client, key)
    return jobs.describe(key, record, producer.task_meta(key), producer.store)


async def wait_for(request: Request, job: Job, seconds: float) -> bool:
    """True once the result is in the store, False after `seconds` (or a disconnect).

    Each check reads the job's state in Redis and asks the store only once it reports
    success, all off the event loop: a slow store never stalls other requests.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    delay = defaults.JOB_POLL_FIRST
    while True:
        if await run_in_threadpool(job.poll) is not None:
            return True
        now = loop.time()
        if now >= deadline or await request.is_disconnected():
            return False
        await asyncio.sleep(min(delay, deadline - now))
        delay = min(defaults.JOB_POLL_MAX, delay * 2)


def known_key(key: str) -> str:
    """The job id if it looks like one; else 404, as for an unknown job."""
    if not KEY_RE.fullmatch(key):
        raise ApiError(404, "not_found", f"no job {key!r}")
    return key


def base_url(request: Request, settings: Settings) -> str:
    """This API's URL as clients see it: BGQ_PUBLIC_URL, else the request's own."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


def job_response(
    request: Request, settings: Settings, key: str, status: str, cached: bool
) -> JSONResponse:
    """202 with the job and `Location` its URL."""
    body = {
        "id": key,
        "status": status,
        "cached": cached,
        "result_url": base_url(request, settings) + jobs.result_path(key),
    }
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{key}"})


async def image_response(store: Store, output: str, cached: bool) -> Response:
    """The result: a file sent as is from a filesystem store, else streamed from the store.

    The stream's first piece is read before any header is sent, so a store that fails
    answers an error status instead of a broken 200.
    """
    key = contract.name_digest(output)
    headers = {
        "ETag": f'"{key}"',
        "Cache-Control": IMMUTABLE,
        "X-Bgq-Job-Id": key,
        "X-Bgq-Cached": "true" if cached else "false",
    }
    kind = contract.media_type(output)
    path = store.local_path(output)
    if path is not None:
        return FileResponse(path, media_type=kind, headers=headers)
    chunks = store.chunks(output)
    first = await run_in_threadpool(next, chunks, b"")
    body = itertools.chain((first,), chunks)
    return StreamingResponse(body, media_type=kind, headers=headers)
