"""The HTTP API served over a real socket, on real Redis and real prefork workers."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bgq import contract, defaults, jobs
from bgq.contract import Counter
from bgq.options import Options
from bgq.process import free_port
from bgq.stack import LocalStack
from bgq.store import Entry, FileStore, open_store
from producer import Producer
from producer.api import create_app
from producer.http_client import ApiError, HttpClient
from tests.helpers import (
    BGQ,
    JPEG,
    ApiServer,
    Gate,
    LocalStackControl,
    answers,
    bgq_in_process,
    error_of,
    pixels,
    sample_bytes,
    settle,
    stats,
    variant,
    wait_for,
)
from tests.stacks import both_stores


@both_stores
def test_sync_remove_returns_rembgs_png(
    http: httpx.Client, reference: Callable[..., bytes]
) -> None:
    data = sample_bytes("anime-girl-1.jpg")
    multipart = http.post("/v1/remove", files={"file": ("a.jpg", data, "image/jpeg")})
    assert multipart.status_code == 200, multipart.text
    assert multipart.headers["content-type"] == "image/png"
    mode, got = pixels(multipart.content)
    want_mode, want = pixels(reference(data))
    assert mode == want_mode and (got == want).all()
    # The same image as a raw body is a cache hit with the same bytes.
    raw = http.post("/v1/remove", content=data, headers=JPEG)
    assert raw.status_code == 200 and raw.headers["x-bgq-cached"] == "true"
    assert raw.content == multipart.content
    assert raw.headers["etag"] == f'"{raw.headers["x-bgq-job-id"]}"'


def test_options_as_query_or_form_fields(
    http: httpx.Client, reference: Callable[..., bytes]
) -> None:
    data = sample_bytes("car-1.jpg")
    options = {"bgcolor": "255,255,255,255", "post_process_mask": "true"}
    by_form = http.post("/v1/remove", files={"file": ("c.jpg", data)}, data=options)
    by_query = http.post("/v1/remove", params=options, content=data, headers=JPEG)
    assert by_form.status_code == by_query.status_code == 200
    assert by_form.headers["x-bgq-job-id"] == by_query.headers["x-bgq-job-id"]
    want = reference(data, bgcolor=(255, 255, 255, 255), post_process_mask=True)
    assert (pixels(by_query.content)[1] == pixels(want)[1]).all()


@both_stores
def test_async_job_lifecycle(base: str, api_stack: LocalStack) -> None:
    data = variant("cloth-1.jpg", (0, 0, 500, 700))
    control = LocalStackControl(api_stack)
    with HttpClient(base) as client:
        control.pause()
        try:
            job = client.submit(data)
            assert job["status"] == "queued" and job["cached"] is False
            assert job["result_url"] == f"{base}/v1/jobs/{job['id']}/result"
            view = client.job(job["id"])
            assert view["status"] == "queued" and view["model"] == "u2netp"
            assert view["created_at"] and view["finished_at"] is None
            with pytest.raises(ApiError) as not_ready:
                client.result(job["id"])
            assert not_ready.value.status == 409 and not_ready.value.code == "not_ready"
        finally:
            control.resume()
        png = client.wait(job["id"], timeout=120)
        done = client.job(job["id"])
        assert done["status"] == "done" and done["finished_at"] >= done["created_at"]
        # Idempotent: the job id is the cache key.
        again = client.submit(data)
        assert again["id"] == job["id"] and again["status"] == "done" and again["cached"]
    with httpx.Client(base_url=base) as http:
        result = http.get(f"/v1/jobs/{job['id']}/result")
        assert result.content == png
        assert result.headers["etag"] == f'"{job["id"]}"'
        assert "immutable" in result.headers["cache-control"]
        cached = http.get(
            f"/v1/jobs/{job['id']}/result", headers={"If-None-Match": result.headers["etag"]}
        )
        assert cached.status_code == 304
        created = http.post("/v1/jobs", content=data, headers=JPEG)
        assert created.status_code == 202 and created.headers["location"] == f"/v1/jobs/{job['id']}"


def test_remove_answers_202_when_not_ready_within_wait(
    http: httpx.Client, api_stack: LocalStack
) -> None:
    control = LocalStackControl(api_stack)
    control.pause()
    try:
        response = http.post(
            "/v1/remove",
            params={"wait": "0.2"},
            content=variant("car-1.jpg", (5, 5, 300, 300)),
            headers=JPEG,
        )
    finally:
        control.resume()
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and response.headers["location"] == f"/v1/jobs/{job['id']}"
    wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done", what="done")


@both_stores
def test_failed_job(http: httpx.Client) -> None:
    truncated = sample_bytes("car-1.jpg")[:30000]  # a valid header: only the worker finds out
    response = http.post("/v1/remove", content=truncated, headers=JPEG)
    assert response.status_code == 422
    assert error_of(response)["code"] == "job_failed"
    assert "truncated" in error_of(response)["message"]
    key = contract.cache_key(contract.input_digest(truncated), "u2netp", Options())
    view = http.get(f"/v1/jobs/{key}").json()
    assert view["status"] == "failed" and "truncated" in view["error"]
    result = http.get(f"/v1/jobs/{key}/result")
    assert result.status_code == 409 and error_of(result)["code"] == "job_failed"


@both_stores
def test_concurrent_identical_posts_run_one_inference(base: str, redis_client: redis.Redis) -> None:
    data = variant("anime-girl-1.jpg", (20, 20, 620, 500))
    before = stats(redis_client).get(Counter.COMPUTED, 0)

    async def post_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/v1/remove", content=data, headers=JPEG) for _ in range(50))
            )

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.content for r in responses}) == 1
    settle(redis_client, responses[0].headers["x-bgq-job-id"])
    assert stats(redis_client).get(Counter.COMPUTED, 0) - before == 1


def big_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500)).save(buf, "JPEG")  # 3 MP in a few KB
    return buf.getvalue()


# python-multipart raises its own parse error for this, which Starlette does not turn into a 400.
BAD_MULTIPART_HEADER = {
    "content": b'--x\r\nContent-Disposition: form-data; name="a"\r\nX-Bad\r: 1\r\n\r\nv\r\n'
    b"--x--\r\n",
    "headers": {"Content-Type": "multipart/form-data; boundary=x"},
}


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({"content": os.urandom(2 * 2**20)}, 413, "payload_too_large"),
        ({"content": iter([os.urandom(2**19)] * 4)}, 413, "payload_too_large"),  # chunked
        ({"content": b"plain text, not an image"}, 415, "unsupported_media_type"),
        ({"content": b""}, 415, "unsupported_media_type"),
        ({"content": big_image()}, 413, "image_too_large"),
        ({"params": {"model": "no-such-model"}}, 422, "invalid_request"),
        ({"params": {"alpha_matting_erode_size": "-1"}}, 422, "invalid_request"),
        ({"params": {"bgcolor": "1,2,3"}}, 422, "invalid_request"),
        ({"params": {"alpha_matting": "maybe"}}, 422, "invalid_request"),
        ({"params": {"no_such_option": "1"}}, 422, "invalid_request"),
        ({"params": {"wait": "soon"}}, 422, "invalid_request"),
        ({"headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"files": {"other": ("a.jpg", b"x")}}, 422, "invalid_request"),
        (BAD_MULTIPART_HEADER, 422, "invalid_request"),
    ],
    ids=[
        "body-over-limit",
        "chunked-body-over-limit",
        "not-an-image",
        "empty",
        "too-many-megapixels",
        "unknown-model",
        "bad-option",
        "bad-bgcolor",
        "bad-bool",
        "unknown-option",
        "bad-wait",
        "wrong-content-type",
        "multipart-without-file",
        "multipart-header-with-a-bare-cr",
    ],
)
def test_errors(http: httpx.Client, request_args: dict[str, Any], status: int, code: str) -> None:
    kwargs: dict[str, Any] = {"content": sample_bytes("car-1.jpg"), "headers": JPEG}
    kwargs.update(request_args)
    if "files" in kwargs:
        del kwargs["content"], kwargs["headers"]
    response = http.post("/v1/remove", **kwargs)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
    assert "Traceback" not in response.text


def test_unknown_routes_and_jobs_are_404_json(http: httpx.Client) -> None:
    for path in ("/v1/jobs/" + "0" * 64, "/v1/jobs/not-a-key", "/v1/jobs/" + "0" * 64 + "/result"):
        response = http.get(path)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert error_of(http.get("/nowhere"))["code"] == "not_found"
    assert error_of(http.get("/v1/remove"))["code"] == "method_not_allowed"


def test_auth(serve: Callable[..., str]) -> None:
    url = serve(api_keys="key-one, key-two")
    data = sample_bytes("car-1.jpg")
    with httpx.Client(base_url=url, timeout=120) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            response = http.post("/v1/remove", content=data, headers={**JPEG, **headers})
            assert response.status_code == 401
            assert error_of(response)["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/jobs/" + "0" * 64).status_code == 401
        for open_route in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert http.get(open_route).status_code == 200, open_route
        remove = http.get("/openapi.json").json()["paths"]["/v1/remove"]["post"]
        assert remove["security"] == [{"bearer": []}] and "401" in remove["responses"]
    with HttpClient(url, api_key="key-two") as client:
        assert client.remove(data)[:8] == b"\x89PNG\r\n\x1a\n"


def cache_lookups(http: httpx.Client) -> dict[str, float]:
    """bgq_api_cache_lookups_total by result, parsed from the API's /metrics page."""
    families = text_string_to_metric_families(http.get("/metrics").text)
    return {
        sample.labels["result"]: sample.value
        for family in families
        if family.name == "bgq_api_cache_lookups"
        for sample in family.samples
        if sample.name == "bgq_api_cache_lookups_total"
    }


def test_health_and_metrics(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
    data = sample_bytes("car-1.jpg")
    assert http.post("/v1/remove", content=data, headers=JPEG).status_code == 200  # now stored
    before = cache_lookups(http)
    assert http.post("/v1/remove", content=data, headers=JPEG).headers["x-bgq-cached"] == "true"
    assert cache_lookups(http) == {"hit": before["hit"] + 1, "miss": before["miss"]}
    text = http.get("/metrics").text
    assert 'bgq_api_requests_total{method="POST",route="/v1/remove",status="200"}' in text
    assert "bgq_api_request_seconds_bucket" in text
    assert "/v1/jobs/{job_id}" in http.get("/openapi.json").json()["paths"]
    assert http.get("/docs").status_code == 200


def test_redis_down(serve: Callable[..., str]) -> None:
    url = serve(redis_url="redis://:hunter2@127.0.0.1:9/0")  # nothing listens there
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        down = http.post("/v1/remove", content=variant("car-1.jpg", (1, 1, 99, 99)), headers=JPEG)
        assert down.status_code == 503 and error_of(down)["code"] == "unavailable"
        job = http.get("/v1/jobs/" + "0" * 64)
        assert job.status_code == 503 and error_of(job)["code"] == "unavailable"
        for response in (ready, down, job):
            assert "hunter2" not in response.text
            assert response.headers["retry-after"] == str(defaults.API_RETRY_AFTER)


class StuckStore(FileStore):
    """A store whose lookups hang until the test lets them go, like a congested NFS mount."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.waiting = 0  # lookups under way
        self.lock = threading.Lock()
        self.go = threading.Event()

    def stat(self, kind: str, name: str) -> Entry | None:
        with self.lock:
            self.waiting += 1
        self.go.wait(timeout=60)
        return super().stat(kind, name)


def test_a_slow_store_never_stalls_the_event_loop(api_stack: LocalStack) -> None:
    settings = api_stack.settings.model_copy(update={"redis_url": api_stack.url})
    producer = Producer(settings)
    producer.store = store = StuckStore(settings.store_dir)
    server = ApiServer(settings, create_app(settings, producer)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            slow = [
                threading.Thread(target=http.get, args=(f"/v1/jobs/{n:064x}/result",))
                for n in range(4)
            ]
            for thread in slow:
                thread.start()
            wait_for(lambda: store.waiting >= 4, timeout=30, what="4 store lookups under way")
            # Answered while all 4 lookups hang: a stalled loop could answer only after them.
            assert http.get("/healthz").status_code == 200
            store.go.set()
            for thread in slow:
                thread.join()
    finally:
        store.go.set()
        server.stop()


def test_result_url_keeps_the_first_submitters_host(http: httpx.Client) -> None:
    data = variant("car-1.jpg", (7, 7, 207, 207))
    first = http.post("/v1/jobs", content=data, headers=JPEG).json()
    http.post("/v1/jobs", content=data, headers={**JPEG, "Host": "evil.example"})
    assert http.get(f"/v1/jobs/{first['id']}").json()["result_url"] == first["result_url"]


def test_job_record_describes_a_queued_job(api_stack: LocalStack) -> None:
    """The record alone (no task yet) reads as queued; Celery's state and the store decide."""
    args = contract.TaskArgs.build("0" * 64, "u2netp", Options())
    client = redis.Redis.from_url(api_stack.url)
    try:
        jobs.register(client, args, "http://h:1/")
        record = jobs.read_record(client, args.key)
        store = open_store(api_stack.settings)
        job = jobs.describe(args.key, record, {"status": "PENDING"}, store)
        assert job is not None and job.status == "queued"
        assert job.result_url == f"http://h:1/v1/jobs/{args.key}/result"
        assert jobs.describe(args.key, {}, {"status": "PENDING"}, store) is None
    finally:
        client.delete(contract.job_key(args.key))
        client.close()


def test_bgq_api_command(api_stack: LocalStack, env: dict[str, str]) -> None:
    port = free_port()
    env = {**env, "BGQ_REDIS_URL": api_stack.url, "BGQ_HOME": str(api_stack.settings.home)}
    proc = subprocess.Popen(
        [BGQ, "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: answers(f"http://127.0.0.1:{port}/readyz"), timeout=60, what="bgq api ready"
        )
        with HttpClient(f"http://127.0.0.1:{port}") as client:
            assert client.remove(sample_bytes("car-1.jpg"))[:4] == b"\x89PNG"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_bgq_api_without_broker(env: dict[str, str]) -> None:
    result = bgq_in_process("api", "--port", "1", env=env)
    assert result.returncode == 2 and "no Redis to talk to" in result.stderr


def test_a_job_shows_running_while_a_worker_runs_it(base: str, api_stack: LocalStack) -> None:
    """The worker is held as it reads the job's input (a named pipe in the store): the job's
    state is stored as started before that, so it reads as `running` until let through."""
    data = variant("car-1.jpg", (20, 20, 420, 320))
    store = open_store(api_stack.settings)
    assert isinstance(store, FileStore)
    gate = Gate(store.path(contract.INPUTS, contract.input_digest(data)))
    try:
        with HttpClient(base) as client:
            job = client.submit(data)  # the blob is there: the API keeps the pipe
            gate.wait_for_reader()
            running = client.job(job["id"])
            with pytest.raises(ApiError) as not_ready:
                client.result(job["id"])
            gate.let_through(data)
            png = client.wait(job["id"], timeout=120)
            done = client.job(job["id"])
    finally:
        gate.remove()
    assert running["status"] == "running" and running["finished_at"] is None
    assert not_ready.value.status == 409 and not_ready.value.code == "not_ready"
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and done["status"] == "done"
