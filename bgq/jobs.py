"""Jobs as the HTTP API and webhooks show them: status, times, result URL, pending callbacks.

A job's id is its cache key. The API records what it knows at submission (model, task
arguments, time, its own base URL, callback URLs) in Redis; Celery's task state and the store
say the rest. Workers read the same record to build webhook bodies.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from bgq import contract, defaults, options
from bgq.contract import RESULTS, TaskArgs

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from bgq.store import Store

Status = Literal["queued", "running", "done", "failed"]
FINAL: frozenset[str] = frozenset({"done", "failed"})


class JobView(BaseModel):
    """The JSON of `GET /v1/jobs/{id}`, and the body of a webhook."""

    id: str
    status: Status
    error: str | None = None
    result_url: str | None = None
    model: str | None = None
    created_at: str | None = None
    finished_at: str | None = None


def iso(moment: datetime | float | str | None = None) -> str:
    """UTC ISO 8601 with milliseconds and a Z: now, or a datetime, epoch seconds or ISO text."""
    if moment is None:
        when = datetime.now(UTC)
    elif isinstance(moment, int | float):
        when = datetime.fromtimestamp(moment, UTC)
    elif isinstance(moment, str):
        when = datetime.fromisoformat(moment)
    else:
        when = moment
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_path(key: str) -> str:
    return f"/v1/jobs/{key}/result"


def error_line(exc: Any) -> str:
    """A stored task exception as one line: `Type: message`."""
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return text.splitlines()[0] if text else "unknown error"


def register(
    client: redis.Redis,
    args: TaskArgs,
    base_url: str,
    callback_url: str | None = None,
    *,
    lane: str = contract.INTERACTIVE,
    run: str | None = None,
) -> None:
    """Record a submitted job (its first submission time is kept), its lane and bulk run (to
    enqueue it there again if it is lost), and an optional callback."""
    job_key = contract.job_key(args.key)
    with client.pipeline() as pipe:
        pipe.hsetnx(job_key, "created_at", iso())
        # The first submitter's URL stays: a later one cannot redirect others' result_url.
        pipe.hsetnx(job_key, "base_url", base_url.rstrip("/"))
        pipe.hset(job_key, mapping={"model": args.model, "args": json.dumps(args.to_kwargs())})
        # An interactive submission promotes the job; a bulk one leaves an interactive job be.
        if lane == contract.INTERACTIVE:
            pipe.hset(job_key, "lane", lane)
        else:
            pipe.hsetnx(job_key, "lane", lane)
        if lane == contract.BULK and run is not None:
            pipe.hsetnx(job_key, "run", run)
        pipe.expire(job_key, defaults.RESULT_TTL)
        if callback_url:
            pipe.sadd(contract.callbacks_key(args.key), callback_url)
            pipe.expire(contract.callbacks_key(args.key), defaults.RESULT_TTL)
        pipe.execute()


def read_record(client: redis.Redis, key: str) -> dict[str, str]:
    raw = client.hgetall(contract.job_key(key))
    return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]


def record_args(record: dict[str, str]) -> TaskArgs | None:
    """The task arguments a job was submitted with, if the record has them."""
    return TaskArgs.from_kwargs(json.loads(record["args"])) if "args" in record else None


def record_lane(record: dict[str, str]) -> tuple[str, str | None]:
    """The lane a job was submitted in (interactive if the record does not say) and its run."""
    lane = record.get("lane", contract.INTERACTIVE)
    return (lane if lane in contract.LANES else contract.INTERACTIVE), record.get("run")


def view(
    key: str,
    status: Status,
    record: dict[str, str],
    error: str | None = None,
    finished_at: str | None = None,
) -> JobView:
    return JobView(
        id=key,
        status=status,
        error=error,
        result_url=record.get("base_url", "") + result_path(key),
        model=record.get("model"),
        created_at=record.get("created_at"),
        finished_at=finished_at,
    )


def finished_at(meta: dict[str, Any]) -> str | None:
    """When Celery stored the task's final state (its `date_done`): the one clock of a job's
    end, read by `GET /v1/jobs/{id}` and by the worker that builds the webhook body alike."""
    return iso(meta["date_done"]) if meta.get("date_done") else None


def describe(
    key: str, record: dict[str, str], meta: dict[str, Any], store: Store
) -> JobView | None:
    """The job's view from its record, Celery's state and the store; None if it is unknown."""
    state = meta.get("status")
    done_at = finished_at(meta)
    fmt = _recorded_format(record)
    entry = store.stat(RESULTS, contract.result_name(key, fmt)) if fmt else store.find_output(key)
    if entry is not None:
        return view(key, "done", record, finished_at=done_at or iso(entry.mtime))
    if state == "FAILURE":
        return view(key, "failed", record, error_line(meta.get("result")), done_at)
    if state == "REVOKED":
        return view(key, "failed", record, "the job was revoked", done_at)
    if state in ("STARTED", "RETRY"):
        return view(key, "running", record)
    if state == "SUCCESS":
        return view(key, "failed", record, "the result is no longer in the store; submit again")
    if record:
        return view(key, "queued", record)
    return None


def _recorded_format(record: dict[str, str]) -> str | None:
    """The output format the job was submitted with, if its record says (read leniently: a
    record written by another bgq version still names its format)."""
    try:
        fmt = json.loads(record["args"])["options"].get("format", "png")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return fmt if fmt in options.FORMATS else None


def take_callbacks(client: redis.Redis, key: str) -> list[str]:
    """Atomically remove and return a job's callback URLs (each is sent by one party only)."""
    with client.pipeline() as pipe:
        pipe.smembers(contract.callbacks_key(key))
        pipe.delete(contract.callbacks_key(key))
        urls, _ = pipe.execute()
    return sorted(url.decode() for url in urls)


def send_webhooks(app: Celery, urls: list[str], job: JobView) -> None:
    """Queue one delivery task per URL with the job's JSON as the body."""
    body = job.model_dump_json()
    for url in urls:
        app.send_task(
            contract.WEBHOOK_TASK_NAME,
            kwargs={"url": url, "body": body},
            queue=contract.WEBHOOK_QUEUE,
        )


def notify_if_final(app: Celery, client: redis.Redis, job: JobView | None) -> None:
    """Send a finished job's pending callbacks (after registering one, in case it just ended)."""
    if job is not None and job.status in FINAL:
        urls = take_callbacks(client, job.id)
        if urls:
            send_webhooks(app, urls, job)
