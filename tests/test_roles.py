"""Worker roles: a worker consuming only webhooks and maintenance loads no model, yet serves."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

from bgq import contract, webhooks
from bgq.stack import LocalStack
from bgq.store import FileStore, open_store
from producer import Producer
from tests.helpers import serving, stale_leftovers, wait_for
from tests.stacks import StackFactory

SECRET = "roles-test-secret"


class Hook:
    """A webhook receiver on loopback that records each POST's headers and body."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


@contextlib.contextmanager
def hook() -> Iterator[Hook]:
    receiver = Hook()
    with serving(receiver.server):
        yield receiver


def pool_processes(stack: LocalStack) -> list[psutil.Process]:
    assert stack.worker is not None
    return psutil.Process(stack.worker.pid).children()


def onnxruntime_loaded(process: psutil.Process) -> bool:
    """Whether onnxruntime's library is mapped into the process (a session was created)."""
    return any("onnxruntime" in m.path for m in process.memory_maps())


def test_webhook_and_maintenance_worker_loads_no_model(make_stack: StackFactory) -> None:
    queues = [contract.WEBHOOK_QUEUE, contract.MAINTENANCE_QUEUE]
    stack = make_stack(queues=queues, webhook_secret=SECRET, webhook_allow_private=True)
    body = json.dumps({"id": "k", "status": "done"})
    store = open_store(stack.settings)
    assert isinstance(store, FileStore)
    stale_input, temporary = stale_leftovers(store)  # in a store that holds nothing else
    with Producer(stack.settings) as producer, hook() as receiver:
        producer.app.send_task(contract.WEBHOOK_TASK_NAME, args=[receiver.url, body])
        wait_for(lambda: receiver.received, timeout=60, what="the webhook")
        prune = producer.app.send_task(contract.PRUNE_TASK_NAME).id
        wait_for(lambda: producer.task_meta(prune)["status"] == "SUCCESS", what="the prune")
        report = producer.task_meta(prune)["result"]
    assert (report["removed"], report["kept"]) == (0, 0)
    assert (report["inputs_removed"], report["temporaries_removed"]) == (1, 1)
    assert not stale_input.exists() and not temporary.exists()
    headers, data = receiver.received[0]
    assert data == body.encode()
    assert webhooks.verify(SECRET, data, headers[webhooks.SIGNATURE_HEADER])
    pools = pool_processes(stack)
    assert len(pools) == 2
    assert not any(onnxruntime_loaded(p) for p in pools)
    assert stack.log is not None
    assert stack.log.read_text().count("no model loaded") == 2


def test_an_image_worker_loads_the_model_in_every_pool_process(make_stack: StackFactory) -> None:
    stack = make_stack()
    pools = pool_processes(stack)
    assert len(pools) == 2
    wait_for(lambda: all(onnxruntime_loaded(p) for p in pools), timeout=60, what="the sessions")
    assert stack.log is not None
    assert "no model loaded" not in stack.log.read_text()
