"""The operations routes of `bgq api`, outside /v1 and its keys: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from bgq.errors import BgqError
from bgq.store import Store
from producer.api.deps import MetricsDep, ProducerDep, StoreDep
from producer.api.errors import RETRY_LATER
from producer.client import Producer

router = APIRouter()


@router.get("/healthz", summary="The process is alive", operation_id="healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis answers, at least one worker is online and the store is usable",
    operation_id="readyz",
)
async def readyz(producer: ProducerDep, store: StoreDep) -> JSONResponse:
    body = await run_in_threadpool(readiness, producer, store)
    ready = body["ready"]
    return JSONResponse(
        body, status_code=200 if ready else 503, headers=None if ready else RETRY_LATER
    )


@router.get(
    "/metrics", summary="Prometheus metrics", operation_id="metrics", response_class=Response
)
async def prometheus(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def readiness(producer: Producer, store: Store) -> dict[str, Any]:
    """What /readyz answers: whether Redis, workers and the store are there, and if not why."""
    body: dict[str, Any] = {"ready": False, "redis": False, "workers": 0, "store": False}
    problems = []
    try:
        producer.app.backend.client.ping()
        replies = producer.app.control.ping(timeout=1.0) or []
        body["redis"], body["workers"] = True, sum(len(r) for r in replies)
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    try:
        store.check()  # what the API needs of it: reachable, writable
        body["store"] = True
    except BgqError as exc:
        problems.append(str(exc))
    body["ready"] = body["redis"] and body["workers"] > 0 and body["store"]
    if problems:
        body["error"] = "; ".join(problems)
    return body
