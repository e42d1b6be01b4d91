"""Lanes on the job routes and per-key limits (BGQ_API_LIMITS): real API processes sharing the
test stack's real Redis, real prefork workers, the u2netp model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bgq import contract, jobs, lanes, quotas
from bgq.settings import Settings
from bgq.stack import LocalStack
from producer import Producer
from producer.api import ratelimit
from producer.api.errors import ApiError
from producer.api.metrics import Metrics
from tests.helpers import (
    JPEG,
    StandInWorker,
    bgq_in_process,
    consume,
    error_of,
    settle_polls,
    variant,
    wait_for,
)


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def post(http: httpx.Client, data: bytes, lane: str = "interactive") -> httpx.Response:
    return http.post("/v1/jobs", content=data, headers=JPEG, params={"lane": lane})


def limit_fields(response: httpx.Response) -> tuple[str, str]:
    return response.headers.get("ratelimit-policy", ""), response.headers.get("ratelimit", "")


def limited(url: str) -> dict[tuple[str, str, str], float]:
    """bgq_api_rate_limited_total by (key id, lane, limit), from one API's /metrics."""
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    return {
        (s.labels["key"], s.labels["lane"], s.labels["limit"]): s.value
        for family in families
        if family.name == "bgq_api_rate_limited"
        for s in family.samples
        if s.name == "bgq_api_rate_limited_total"
    }


@pytest.fixture
def bulk_paused(api_stack: LocalStack, redis_client: redis.Redis) -> Iterator[Callable[[], None]]:
    """The stack's worker stops taking bulk jobs (they stay outstanding) until `resume()`.

    Meanwhile a stand-in entry says the bulk lane is served (the worker's own entry no longer
    does once it stops consuming it), so bulk submissions are accepted and wait: it stays
    until the test ends, past the worker's next beat after `resume()`."""
    app = Producer(api_stack.settings.model_copy(update={"redis_url": api_stack.url})).app
    with StandInWorker(api_stack.url, lanes=(contract.BULK,)):
        consume(app, api_stack.hostname, contract.BULK_QUEUE, on=False)
        settle_polls(redis_client)
        resumed: list[bool] = []

        def resume() -> None:
            if not resumed:
                consume(app, api_stack.hostname, contract.BULK_QUEUE, on=True)
                resumed.append(True)

        yield resume
        resume()
        wait_for(  # the worker's own entry serves the bulk lane again: the stand-in may go
            lambda: contract.BULK in lanes.capacity(redis_client)[api_stack.hostname].lanes,
            what="the worker's entry to serve the bulk lane again",
        )


def test_requests_per_minute_hold_across_two_api_processes(serve: Callable[..., str]) -> None:
    free = "rpm-free-key"
    limits = f"*: interactive.rpm=3; {quotas.key_id(free)}: interactive.rpm=none"
    one, two = (serve(api_keys=f"rpm-key, {free}", api_limits=limits) for _ in range(2))
    data = variant("car-1.jpg", (0, 0, 240, 160))
    seen = []
    with client(one, "rpm-key") as first, client(two, "rpm-key") as second:
        for http in (first, second, first):
            response = post(http, data)
            assert response.status_code == 202, response.text
            seen.append(limit_fields(response))
        refused = post(second, data)
        assert post(second, data, "bulk").status_code == 202  # a lane of its own
    assert {policy for policy, _ in seen} == {'"interactive-rpm";q=3;w=60'}
    left = [re.fullmatch(r'"interactive-rpm";r=(\d);t=([1-9]\d?)', now) for _, now in seen]
    assert [int(match[1]) for match in left if match] == [2, 1, 0], seen

    assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limited"
    assert "3 interactive requests per minute" in error_of(refused)["message"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 60
    assert limit_fields(refused) == (
        '"interactive-rpm";q=3;w=60',
        f'"interactive-rpm";r=0;t={wait}',
    )
    with client(one, free) as unlimited:  # its own entry lifts the `*` limit
        answers = [post(unlimited, data) for _ in range(5)]
    assert all(a.status_code == 202 and "ratelimit" not in a.headers for a in answers)

    # Counted under the key's short id, never the key itself.
    assert limited(two) == {(quotas.key_id("rpm-key"), "interactive", "rpm"): 1.0}
    assert "rpm-key" not in httpx.get(two + "/metrics").text


@pytest.fixture
def outstanding(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[[str], Any]]:
    """`admit(job)`: ADMIT on real Redis for a key with 100 bulk jobs outstanding, 64 old ones
    still holding their guards (queued or running) and 36 newer ones ended (guards gone)."""
    caller = quotas.key_id("prune-key")
    table: quotas.Table = {"*": {("bulk", "jobs"): 100}}
    old, new = [f"job-0-{n:02}" for n in range(64)], [f"job-1-{n:02}" for n in range(36)]
    with Producer(Settings(home=tmp_path, redis_url=redis_url)) as producer:
        limiter = ratelimit.Limiter(table, producer, Metrics())

        def admit(job: str) -> Any:
            return limiter.hold_job(caller, "bulk", job, lambda: False, [])

        try:
            for job in [*old, *new]:  # admitted in this order, then enqueued
                admit(job)
                redis_client.set(contract.guard_key(job), "held", ex=600)
                limiter.release_job(caller, "bulk", job, outstanding=True)
            redis_client.delete(*(contract.guard_key(job) for job in new))  # they ended
            redis_client.delete(f"{ratelimit.PREFIX}{caller}:bulk:cursor")  # checks from the oldest
            assert redis_client.zcard(f"{ratelimit.PREFIX}{caller}:bulk:jobs") == 100
            yield admit
        finally:
            redis_client.delete(*(contract.guard_key(job) for job in old))
            redis_client.delete(*redis_client.keys(f"{ratelimit.PREFIX}{caller}:*"))


def test_jobs_outstanding_are_checked_past_the_oldest(outstanding: Callable[[str], Any]) -> None:
    """At its limit, a key whose oldest jobs still run is let in once newer ones have ended:
    the check reaches past the oldest batch (it once checked only the 64 oldest: refused)."""
    assert outstanding("job-2-00").remaining == 100 - 65


def test_jobs_outstanding_checks_go_round_over_admissions(
    outstanding: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one batch a call (as beyond PRUNE_MOST jobs), successive admissions check the
    next jobs from where the last stopped, so the ended ones are found on the next call."""
    monkeypatch.setattr(ratelimit, "PRUNE_MOST", ratelimit.PRUNE_BATCH)
    with pytest.raises(ApiError) as refused:
        outstanding("job-2-00")
    assert refused.value.status == 429 and "100 bulk jobs outstanding" in refused.value.message
    assert outstanding("job-2-00").remaining == 100 - 65


def message_of(client: redis.Redis, key: str, run: str) -> dict[str, Any]:
    """The headers of the job's message, waiting in its run's list or in the bulk queue."""
    for queue in (contract.run_queue(run), contract.BULK_QUEUE):
        for raw in client.lrange(queue, 0, -1):  # type: ignore[union-attr]
            headers = json.loads(raw)["headers"]
            if headers["id"] == key:
                return dict(headers)
    raise AssertionError(f"no message of {key} waits in run {run}")


def test_jobs_outstanding_per_key_and_lane(
    serve: Callable[..., str],
    bulk_paused: Callable[[], None],
    redis_client: redis.Redis,
) -> None:
    one, two = (serve(api_keys="jobs-key", api_limits="*: bulk.jobs=2") for _ in range(2))
    run = f"key-{quotas.key_id('jobs-key')}"
    images = [variant("cloth-1.jpg", (n * 9, 0, n * 9 + 200, 300)) for n in range(3)]
    with client(one, "jobs-key") as first, client(two, "jobs-key") as second:
        stored = post(first, images[2], "interactive").json()  # no interactive limit
        answers = [
            post(http, image, "bulk")
            for http, image in zip((first, second), images[:2], strict=True)
        ]
        assert [a.status_code for a in answers] == [202, 202]
        assert [limit_fields(a)[1] for a in answers] == ['"bulk-jobs";r=1', '"bulk-jobs";r=0']
        ids = [a.json()["id"] for a in answers]

        refused = post(first, variant("cloth-1.jpg", (50, 50, 250, 250)), "bulk")
        assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limited"
        assert refused.headers["retry-after"] == "5"
        assert limit_fields(refused) == (
            '"bulk-jobs";q=2;qu="concurrent-requests"',
            '"bulk-jobs";r=0',
        )
        assert post(second, images[0], "bulk").status_code == 202  # the same job again
        wait_for(lambda: first.get(f"/v1/jobs/{stored['id']}").json()["status"] == "done")
        hit = post(second, images[2], "bulk")  # over the limit, but a stored result
        assert hit.status_code == 202 and hit.json()["cached"] is True

        # A bulk job of the API is the key's run's, and its record says so (for re-enqueuing).
        for key in ids:
            assert message_of(redis_client, key, run)[contract.RUN_HEADER] == run
            assert jobs.record_lane(jobs.read_record(redis_client, key)) == ("bulk", run)
        bulk_paused()
        for key in ids:
            wait_for(lambda key=key: first.get(f"/v1/jobs/{key}").json()["status"] == "done")
        assert post(second, images[1], "bulk").json()["cached"] is True
        assert post(first, variant("cloth-1.jpg", (5, 5, 205, 205)), "bulk").status_code == 202
    assert limited(one) == {(quotas.key_id("jobs-key"), "bulk", "jobs"): 1.0}


def test_a_lost_bulk_job_is_enqueued_again_in_its_run(
    serve: Callable[..., str], bulk_paused: Callable[[], None], redis_client: redis.Redis
) -> None:
    """GET /v1/jobs/{id} of a job whose message and guard are gone enqueues it again, in the
    lane and run it was submitted in."""
    url = serve(api_keys="lost-key")
    run = f"key-{quotas.key_id('lost-key')}"
    with client(url, "lost-key") as http:
        job = post(http, variant("anime-girl-1.jpg", (0, 0, 220, 220)), "bulk").json()
        message = message_of(redis_client, job["id"], run)
        for queue in (contract.run_queue(run), contract.BULK_QUEUE):
            redis_client.delete(queue)
        redis_client.delete(contract.guard_key(job["id"]))
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
        again = message_of(redis_client, job["id"], run)
        assert again[contract.LANE_HEADER] == "bulk" and again[contract.RUN_HEADER] == run
        assert again[contract.ENQUEUED_HEADER] > message[contract.ENQUEUED_HEADER]
        bulk_paused()
        wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done")


@pytest.mark.parametrize(
    "request_args",
    [
        {"params": {"lane": "fast"}, "content": b"x", "headers": JPEG},
        {"files": {"file": ("a.jpg", b"x")}, "data": {"lane": "BULK"}},
        {"json": {"image_url": "http://127.0.0.1:1/a.jpg", "lane": "express"}},
        {"json": {"image_url": "http://127.0.0.1:1/a.jpg", "lane": 1}},
    ],
)
def test_lane_is_checked_wherever_it_is_sent(
    http: httpx.Client, request_args: dict[str, Any]
) -> None:
    for route in ("/v1/remove", "/v1/jobs"):
        response = http.post(route, **request_args)
        assert response.status_code == 422, response.text
        assert error_of(response)["code"] == "invalid_request"
        assert "lane" in error_of(response)["message"]


def test_without_keys_bulk_jobs_are_the_apis_run(
    http: httpx.Client, redis_client: redis.Redis
) -> None:
    data = variant("car-1.jpg", (30, 30, 230, 230))
    job = http.post("/v1/jobs", files={"file": ("c.jpg", data)}, data={"lane": "bulk"}).json()
    assert jobs.record_lane(jobs.read_record(redis_client, job["id"])) == ("bulk", "api")
    wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done")


def test_the_document_lists_lane_and_the_429_only_under_limits(serve: Callable[..., str]) -> None:
    plain = httpx.get(serve() + "/openapi.json").json()["paths"]
    url = serve(api_keys="doc-key", api_limits="*: interactive.rpm=100")
    under = httpx.get(url + "/openapi.json").json()["paths"]
    for path in ("/v1/remove", "/v1/jobs"):
        lane = next(p for p in plain[path]["post"]["parameters"] if p["name"] == "lane")
        assert lane["schema"]["enum"] == ["interactive", "bulk"]
        assert "429" not in plain[path]["post"]["responses"]
        answer = under[path]["post"]["responses"]["429"]
        assert set(answer["headers"]) == {"Retry-After", "RateLimit-Policy", "RateLimit"}
        assert "RateLimit" in under[path]["post"]["responses"]["202"]["headers"]
    assert "429" not in under["/v1/jobs/{job_id}"]["get"]["responses"]


def test_key_ids_command(env: dict[str, str]) -> None:
    done = bgq_in_process("api", "--key-ids", env={**env, "BGQ_API_KEYS": "first, second"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"1  {quotas.key_id('first')}",
        f"2  {quotas.key_id('second')}",
    ]
    assert "first" not in done.stdout


def test_key_ids_command_never_shows_a_key_written_for_its_id(env: dict[str, str]) -> None:
    limits = "supersecretkey123: bulk.rpm=3"
    keys = {"BGQ_API_KEYS": "supersecretkey123", "BGQ_API_LIMITS": limits}
    done = bgq_in_process("api", "--key-ids", env={**env, **keys})
    assert done.returncode != 0
    assert "BGQ_API_LIMITS" in done.stderr and "not a key id" in done.stderr
    for shown in (done.stdout, done.stderr):
        assert "supersecretkey" not in shown and limits not in shown
