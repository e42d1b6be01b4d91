"""Webhooks of the HTTP API on real workers: signed, retried, refused, each sent once."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis

from bgq import contract, webhooks
from bgq.stack import LocalStack
from producer import Producer
from producer.http_client import ApiError, HttpClient
from tests.helpers import (
    JPEG,
    LocalStackControl,
    error_of,
    inspect_worker,
    sample_bytes,
    variant,
    wait_for,
)
from tests.stacks import WEBHOOK_SECRET, both_stores


class Receiver:
    """A webhook receiver on loopback; answers 500 to the first `fail_first` deliveries."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.received) <= fail_first else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/bgq"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(fail_first: int = 0) -> Receiver:
        made.append(Receiver(fail_first))
        return made[-1]

    yield make
    for r in made:
        r.close()


def signed_job(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    signature = headers[webhooks.SIGNATURE_HEADER]
    assert webhooks.verify(WEBHOOK_SECRET, body, signature)
    assert not webhooks.verify("another-secret", body, signature)
    return dict(json.loads(body))


def delivered(client: redis.Redis, url: str) -> dict[str, Any] | None:
    """The stored result of the delivery task that succeeded in POSTing to `url`, if one has."""
    for key in client.scan_iter(match="celery-task-meta-*", count=1000):
        meta = json.loads(client.get(key) or b"{}")
        result = meta.get("result") if meta.get("status") == "SUCCESS" else None
        if isinstance(result, dict) and result.get("url") == url:
            return dict(result)
    return None


@both_stores
def test_webhook_signed_and_retried_after_a_500(
    api_stack: LocalStack, base: str, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver(fail_first=1)
    data = variant("car-1.jpg", (10, 0, 470, 350))
    with HttpClient(base) as client:
        job = client.submit(data, callback_url=hook.url)
        wait_for(lambda: len(hook.received) >= 2, timeout=90, what="the retried webhook")
        (_, b1), (h2, b2) = hook.received[:2]
        assert b1 == b2
        payload = signed_job(h2, b2)
        assert payload["id"] == job["id"] and payload["status"] == "done"
        assert payload["result_url"] == job["result_url"] and payload["model"] == "u2netp"
        assert h2[webhooks.EVENT_HEADER] == "job.done"
        # The body is the GET's JSON, finished_at included: one clock (Celery's date_done).
        assert payload == client.job(job["id"]) and payload["finished_at"]
        assert client.result(job["id"])[:4] == b"\x89PNG"
        # A callback on a job that is already done is delivered at once.
        late = receiver()
        assert client.submit(data, callback_url=late.url)["cached"] is True
        wait_for(lambda: late.received, timeout=60, what="the webhook of a cached job")
        assert signed_job(*late.received[0])["status"] == "done"
    # Its delivery task has ended with the second attempt's success: no attempt can follow.
    backend = redis.Redis.from_url(api_stack.url)
    try:
        wait_for(lambda: delivered(backend, hook.url), timeout=60, what="the delivery's success")
        assert delivered(backend, hook.url) == {"url": hook.url, "status": 200, "attempts": 2}
    finally:
        backend.close()
    assert len(hook.received) == 2  # delivered once it succeeded, never again


def test_webhook_of_a_failed_job(base: str, receiver: Callable[..., Receiver]) -> None:
    hook = receiver()
    truncated = sample_bytes("cloth-1.jpg")[:20000]
    with HttpClient(base) as client:
        job = client.submit(truncated, callback_url=hook.url)
        wait_for(lambda: hook.received, timeout=90, what="the failure webhook")
        headers, body = hook.received[0]
        payload = signed_job(headers, body)
        assert payload == client.job(job["id"]) and payload["finished_at"]  # the GET's JSON
    assert payload["id"] == job["id"] and payload["status"] == "failed"
    assert "truncated" in payload["error"] and headers[webhooks.EVENT_HEADER] == "job.failed"


@pytest.fixture(scope="module")
def strict(serve: Callable[..., str]) -> str:
    """An API with the default BGQ_WEBHOOK_ALLOW_PRIVATE=false."""
    return serve(webhook_allow_private=False)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:9/hook", "non-public"),
        ("http://localhost/hook", "non-public"),
        ("http://10.1.2.3/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/hook", "non-public"),
        ("ftp://example.com/hook", "http"),
        ("not a url", "http"),
    ],
)
def test_private_or_odd_callbacks_refused_by_default(strict: str, url: str, words: str) -> None:
    with httpx.Client(base_url=strict, timeout=60) as http:
        response = http.post(
            "/v1/jobs",
            params={"callback_url": url},
            content=sample_bytes("car-1.jpg"),
            headers=JPEG,
        )
    assert response.status_code == 422
    assert words in error_of(response)["message"]


def test_unresolvable_callback_host_accepted(strict: str, api_stack: LocalStack) -> None:
    """DNS may not know the host yet: the job is accepted and its delivery retried."""
    url = "https://hooks.invalid/bgq"
    log = api_stack.log
    assert log is not None
    attempt = re.compile(rf"delivery to {re.escape(url)} failed: .*; retry (\d+)$", re.M)
    before = len(attempt.findall(log.read_text()))
    with HttpClient(strict) as client:
        job = client.submit(sample_bytes("car-1.jpg"), callback_url=url)
    assert job["id"]
    # Each failed attempt says so in the worker's log: the first one, then its retry.
    wait_for(lambda: len(attempt.findall(log.read_text())) >= before + 2, 120, "a retry")
    assert attempt.findall(log.read_text())[before : before + 2] == ["1", "2"]


def test_callback_needs_a_secret(serve: Callable[..., str]) -> None:
    url = serve(webhook_secret=None, webhook_allow_private=True)
    with HttpClient(url) as client, pytest.raises(ApiError) as refused:
        client.submit(sample_bytes("car-1.jpg"), callback_url="http://127.0.0.1:9/")
    assert refused.value.status == 422 and "BGQ_WEBHOOK_SECRET" in refused.value.message


def test_each_registered_callback_is_sent_once(
    base: str, api_stack: LocalStack, receiver: Callable[..., Receiver]
) -> None:
    """Three registrations of two URLs on one queued job: one delivery to each, no other."""
    first, second = receiver(), receiver()
    app = Producer(api_stack.settings).app

    urls = (first.url, second.url)
    log = api_stack.log
    assert log is not None
    # Other tests' deliveries (an unresolvable host's retries) may still run on this worker:
    # only those to this test's receivers count.
    task = re.escape(contract.WEBHOOK_TASK_NAME)
    mine = re.compile(
        "|".join(
            rf"{task}\[[^]]+\] succeeded in .*'url': '{re.escape(url)}'"
            rf"|delivery to {re.escape(url)} failed"
            for url in urls
        )
    )

    def deliveries() -> int:
        """Deliveries to this test's receivers the worker has finished, either way."""
        return len(mine.findall(log.read_text()))

    def pending() -> int:
        """Deliveries to this test's receivers queued, held, or taken and not finished.

        Read in the order a delivery moves (queued, taken, held for a countdown, running), so
        one that moves on between two reads is seen in a later one, never missed; one that
        finishes meanwhile is in the log read after this."""

        def ask(query: str) -> list[dict[str, Any]]:  # the worker must answer (no reply is not 0)
            return list(inspect_worker(app, api_stack.hostname, query))

        raw = app.backend.client.lrange(contract.WEBHOOK_QUEUE, 0, -1)
        queued = [base64.b64decode(json.loads(message)["body"]).decode() for message in raw]
        reserved = ask("reserved")
        held = [task.get("request", task) for task in ask("scheduled")]
        items = [*queued, *reserved, *held, *ask("active")]
        return sum(any(url in repr(item) for url in urls) for item in items)

    before = deliveries()
    data = variant("cloth-1.jpg", (30, 30, 430, 530))
    control = LocalStackControl(api_stack)
    with HttpClient(base) as client:
        control.pause()
        try:
            sent = (first.url, first.url, second.url)
            (key,) = {client.submit(data, callback_url=url)["id"] for url in sent}
        finally:
            control.resume()
        client.wait(key, timeout=120)
    wait_for(lambda: first.received and second.received, timeout=60, what="both webhooks")
    wait_for(lambda: deliveries() - before >= 2, timeout=60, what="both deliveries logged")
    wait_for(lambda: not pending(), timeout=60, what="no delivery left")
    assert deliveries() - before == 2
    assert len(first.received) == len(second.received) == 1
    for headers, body in (*first.received, *second.received):
        assert signed_job(headers, body)["id"] == key
