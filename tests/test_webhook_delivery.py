"""Webhook deliveries on real workers: retries, the cutoff of a dripping receiver, giving up,
and the address check at delivery time. Short BGQ_WEBHOOK_TIMEOUT and _MAX_RETRIES keep each
case to seconds; the workers consume only the webhook queue, so they load no model."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bgq import contract
from bgq.stack import LocalStack
from producer import Producer
from tests.helpers import inspect_worker, serving, wait_for
from tests.stacks import StackFactory

SECRET = "delivery-test-secret"
TIMEOUT = 1.0  # BGQ_WEBHOOK_TIMEOUT: a delivery is cut off after 2 s
BODY = json.dumps({"id": "0" * 64, "status": "done"})
DRIP = b"HTTP/1.1 200 OK\r\nX-Drip: " + b"." * 200 + b"\r\nContent-Length: 0\r\n\r\n"
DRIP_PAUSE = 0.2  # seconds between two bytes: well within a step's timeout, 50 s in all


class Receiver:
    """A receiver on loopback that answers `status`, or with DRIP a byte at a time.

    `posts` counts deliveries; for dripped answers, `cut` counts those the sender hung up on
    before the answer was complete.
    """

    def __init__(self, status: int | None) -> None:
        self.posts = 0
        self.cut = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    for byte in DRIP:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(DRIP_PAUSE)
                except OSError:  # the sender hung up
                    receiver.cut += 1
                self.close_connection = True

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"


@contextlib.contextmanager
def receiving(status: int | None) -> Iterator[Receiver]:
    receiver = Receiver(status)
    with serving(receiver.server):
        yield receiver


def deliver(stack: LocalStack, url: str) -> Any:
    """Queue one delivery as a finished job does, and wait until it succeeded or was given up."""
    app = Producer(stack.settings).app
    sent = app.send_task(contract.WEBHOOK_TASK_NAME, kwargs={"url": url, "body": BODY})
    wait_for(sent.ready, timeout=120, what="the delivery's end")  # no .get(): it leaks
    return sent


def deliveries_taken(stack: LocalStack) -> int:
    """How many deliveries the worker has taken (each retry is taken again)."""
    app = Producer(stack.settings).app
    total = inspect_worker(app, stack.hostname, "stats")["total"]
    return int(total.get(contract.WEBHOOK_TASK_NAME, 0))


def retries_logged(stack: LocalStack, url: str) -> int:
    assert stack.log is not None
    return sum(url in line and "; retry " in line for line in stack.log.read_text().splitlines())


@pytest.fixture(scope="module")
def hooks(make_stack: StackFactory) -> LocalStack:
    """Delivery workers that may call loopback receivers, with one retry and a 2 s cutoff."""
    return make_stack(
        queues=[contract.WEBHOOK_QUEUE],
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_timeout=TIMEOUT,
        webhook_max_retries=1,
    )


def test_a_failing_receiver_is_retried_then_given_up(hooks: LocalStack) -> None:
    with receiving(500) as receiver:
        sent = deliver(hooks, receiver.url)
    assert sent.state == "FAILURE"
    assert type(sent.result).__name__ == "WebhookFailed" and "HTTP 500" in str(sent.result)
    assert receiver.posts == 2  # the try and its one retry, then no more
    assert retries_logged(hooks, receiver.url) == 1


def test_a_dripping_receiver_is_cut_off(hooks: LocalStack) -> None:
    """Each byte comes within the step timeout, so only the cutoff at twice it ends a try: both
    tries hang up before the answer is complete, then the delivery is given up."""
    with receiving(None) as receiver:
        start = time.monotonic()
        sent = deliver(hooks, receiver.url)
        took = time.monotonic() - start
        assert sent.state == "FAILURE" and "SoftTimeLimitExceeded" in str(sent.result)
        assert receiver.posts == 2 and retries_logged(hooks, receiver.url) == 1
        wait_for(lambda: receiver.cut == 2, timeout=30, what="the receiver to see both cuts")
    assert took >= 2 * (2 * TIMEOUT)  # no try ended before its cutoff


def test_delivery_checks_the_address_again_and_retries_a_host_that_does_not_resolve(
    make_stack: StackFactory,
) -> None:
    """Workers without BGQ_WEBHOOK_ALLOW_PRIVATE, as deployed: a loopback callback (which an
    API with the flag let through, or whose DNS moved) is refused for good at delivery; a host
    that does not resolve is retried, then given up. (Last here: it replaces the module's stack.)"""
    strict = make_stack(
        queues=[contract.WEBHOOK_QUEUE], webhook_secret=SECRET, webhook_max_retries=1
    )
    with receiving(200) as receiver:
        refused = deliver(strict, receiver.url)
    assert refused.state == "FAILURE" and type(refused.result).__name__ == "CallbackNotAllowed"
    assert "non-public address" in str(refused.result)
    assert receiver.posts == 0
    assert deliveries_taken(strict) == 1  # permanent: not retried

    unknown = "http://hooks.invalid/bgq"
    unresolved = deliver(strict, unknown)
    assert unresolved.state == "FAILURE" and type(unresolved.result).__name__ == "WebhookFailed"
    assert "does not resolve" in str(unresolved.result)
    assert deliveries_taken(strict) == 3 and retries_logged(strict, unknown) == 1
